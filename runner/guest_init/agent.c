/* kiln-agent: the guest end of kiln's control channel (docs/run.md, "The control channel").
 *
 * Built static by scripts/install-deps.sh (gcc -static -Os; else by kiln on first use) and
 * written into every VM's snapshot as /.kiln/agent; run by /.kiln/init (init.sh) as root.
 *
 *   agent run CHAN     send HEL1, read one frame. SET1: seed the kernel CRNG (RNDADDENTROPY
 *                      + RNDRESEEDCRNG), set CLOCK_REALTIME, the hostname, /etc/machine-id
 *                      and eth0 (busybox ip), resolve the user in the image's /etc/passwd
 *                      and /etc/group, enter the workdir, find argv[0] on PATH, then fork
 *                      and exec the workload (this process's stdin/stdout/stderr, the
 *                      settings' environment only) and wait for it: SIGTERM/SIGINT to the
 *                      agent and an STP1 on CHAN are SIGTERM to the workload, SIGKILL to
 *                      every process an STP1's grace later. Exits with the workload's
 *                      status (128+N for a signal); its own errors: 125 (no settings),
 *                      126 (user, workdir, exec), 127 (not found), 143 (STP1 first).
 *   agent greet CHAN   as run up to the frame, then print it as shell assignments and
 *                      apply nothing (tests: the framing on a host)
 *   agent print FILE   read one SET1 frame and print it likewise (tests)
 *
 * Everything after the settings is done here, in one process, not by init.sh: after a
 * warm restore every code path runs through the emulator's translator again, and the
 * shell's parsing, its builtins' one-byte reads and a second exec cost ~120 ms there.
 *
 * CHAN is the virtio-serial port's device (QEMU), `vsock:PORT` (Firecracker: listen on
 * that AF_VSOCK port; the host connects through Firecracker's hybrid vsock) or `fd:N`
 * (an inherited connected socket: tests). On vsock the host may connect more than once:
 * a connection that closes before a whole frame arrived (the host gave up, or a restored
 * snapshot's transport reset cut the one the hello went out on) is dropped and the next
 * one accepted, which is greeted again. Only a frame that breaks the protocol ends it.
 *
 * A frame is a 4-byte tag, a 4-byte big-endian length and the payload; each tag has a
 * hard limit checked before its payload is read, so the guest never reads unbounded data.
 * greet/print exit status: 0 done, 1 a system call failed, 2 a protocol error (said on
 * stderr), 3 a stop request came instead of the settings.
 */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <linux/vm_sockets.h>
#include <time.h>
#include <unistd.h>

#define SETTINGS_MAX (64 * 1024)
#define STOP_MAX 16
#define SEED_MIN 32
#define SEED_MAX 256

static unsigned char payload[SETTINGS_MAX + 1];

static int fail(int code, const char *what, const char *detail) {
    fprintf(stderr, "kiln-agent: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return code;
}

#define CLOSED 100 /* read_frame: the channel closed before a whole header (not said) */

static int read_full(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* One frame into `payload`: returns its tag's index in `tags` or a negative error. */
static int read_frame(int fd, const char *const *tags, const uint32_t *limits, int ntags,
                      uint32_t *len) {
    unsigned char h[8];
    char msg[96];
    if (read_full(fd, h, sizeof h) < 0) return -CLOSED;
    *len = (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
    for (int i = 0; i < ntags; i++) {
        if (memcmp(h, tags[i], 4) != 0) continue;
        if (*len > limits[i]) {
            snprintf(msg, sizeof msg, "%.4s frame of %u bytes exceeds the limit of %u bytes",
                     tags[i], *len, limits[i]);
            return -fail(2, "refused", msg);
        }
        if (read_full(fd, payload, *len) < 0) return -fail(2, "frame cut short", tags[i]);
        payload[*len] = 0;
        return i;
    }
    snprintf(msg, sizeof msg, "unknown frame type %02x%02x%02x%02x", h[0], h[1], h[2], h[3]);
    return -fail(2, "refused", msg);
}

static void quote(const char *s) {
    putchar('\'');
    for (; *s; s++) {
        if (*s == '\'') fputs("'\\''", stdout);
        else putchar(*s);
    }
    putchar('\'');
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int seed_crng(const char *hex) {
    struct {
        struct rand_pool_info info;
        unsigned char buf[SEED_MAX];
    } req;
    size_t n = strlen(hex) / 2;
    if (strlen(hex) % 2 || n < SEED_MIN || n > SEED_MAX) return fail(2, "bad seed length", 0);
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return fail(2, "seed is not hex", 0);
        req.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    req.info.entropy_count = (int)(n * 8);
    req.info.buf_size = (int)n;
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail(1, "cannot open /dev/urandom", strerror(errno));
    int rc = ioctl(fd, RNDADDENTROPY, &req.info) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0;
    int err = errno;
    close(fd);
    explicit_bzero(&req, sizeof req);
    return rc ? fail(1, "cannot seed the kernel's random generator", strerror(err)) : 0;
}

static int set_clock(const char *text) {
    char *end;
    errno = 0;
    long long sec = strtoll(text, &end, 10);
    if (errno || *end != '.' || strlen(end + 1) != 9) return fail(2, "bad time", text);
    long nsec = strtol(end + 1, &end, 10);
    if (*end || nsec < 0 || sec < 0) return fail(2, "bad time", text);
    struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = nsec};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0)
        return fail(1, "cannot set the clock", strerror(errno));
    return 0;
}

static const char *const SCALARS[] = {"hostname", "machine_id", "workdir", "user",
                                      "mac", "ip", "gw", "dns", "stdin"};
#define NSCALARS (sizeof SCALARS / sizeof *SCALARS)
enum { HOSTNAME, MACHINE_ID, WORKDIR, USER, MAC, IP, GW, DNS, STDIN };
#define MAX_WORDS (SETTINGS_MAX / 5 + 2) /* "arg=" + NUL: a record is >= 5 bytes */

struct settings {
    const char *val[NSCALARS], *seed, *when, *path;
    int has_home, nargs, nenv;
    char *args[MAX_WORDS + 1], *env[MAX_WORDS + 2]; /* NULL-ended; env: room for HOME */
};
static struct settings st;

/* Check every record of the SET1 payload and index it in `st` (the payload is kept). */
static int parse_settings(uint32_t len) {
    if (len == 0 || payload[len - 1] != 0) return fail(2, "settings not NUL-terminated", 0);
    for (char *r = (char *)payload, *next; r < (char *)payload + len; r = next) {
        next = r + strlen(r) + 1;  /* before the '=' below becomes the key's end */
        char *eq = strchr(r, '=');
        if (!eq) return fail(2, "settings record without '='", r);
        *eq = 0;
        char *v = eq + 1;
        size_t k = 0;
        while (k < NSCALARS && strcmp(r, SCALARS[k]) != 0) k++;
        if (k < NSCALARS) st.val[k] = v;
        else if (!strcmp(r, "seed")) st.seed = v;
        else if (!strcmp(r, "time")) st.when = v;
        else if (!strcmp(r, "arg")) st.args[st.nargs++] = v;
        else if (!strcmp(r, "env")) {
            if (!strncmp(v, "PATH=", 5)) st.path = v + 5;
            if (!strncmp(v, "HOME=", 5)) st.has_home = 1;
            st.env[st.nenv++] = v;
        } else return fail(2, "unknown settings record", r);
    }
    if (!st.seed || !st.when || !st.val[HOSTNAME] || !st.nargs)
        return fail(2, "settings incomplete", 0);
    if (!st.path) st.path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (size_t k = 0; k < NSCALARS; k++)
        if (!st.val[k]) st.val[k] = "";
    return 0;
}

/* `print`: the settings as shell assignments (tests: what the agent understood). */
static int print_settings(void) {
    for (size_t k = 0; k < NSCALARS; k++) {
        printf("KILN_");
        for (const char *c = SCALARS[k]; *c; c++) putchar(*c >= 'a' ? *c - 32 : *c);
        putchar('=');
        quote(st.val[k]);
        putchar('\n');
    }
    printf("KILN_PATH=");
    quote(st.path);
    printf("\nKILN_HAS_HOME=%d\nset --", st.has_home);
    for (int i = 0; i < st.nenv; i++) { putchar(' '); quote(st.env[i]); }
    fputs(" --", stdout);
    for (int i = 0; i < st.nargs; i++) { putchar(' '); quote(st.args[i]); }
    putchar('\n');
    return fflush(stdout) ? fail(1, "cannot write the settings", strerror(errno)) : 0;
}

/* A vsock listener on PORT (any CID: the host is CID 2). */
static int vsock_listen(const char *port_text) {
    char *end;
    unsigned long port = strtoul(port_text, &end, 10);
    if (*port_text == 0 || *end || port == 0 || port > 0xfffffffeUL)
        return -fail(2, "bad vsock port", port_text);
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -fail(1, "cannot make a vsock socket", strerror(errno));
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                            .svm_port = (unsigned)port};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) {
        int err = errno;
        close(s);
        return -fail(1, "cannot listen on the vsock port", strerror(err));
    }
    return s;
}

/* One exchange on `fd`: greet (when asked) and read one frame. */
static int exchange(int fd, int greet, uint32_t *len) {
    static const char *const tags[] = {"SET1", "STP1"};
    static const uint32_t limits[] = {SETTINGS_MAX, STOP_MAX};
    if (greet && write(fd, "HEL1\0\0\0\0", 8) != 8) return -CLOSED;
    return read_frame(fd, tags, limits, 2, len);
}

/* The channel's one frame: a device or fd is read once; a vsock listener accepts until a
 * connection brings a whole frame (or breaks the protocol). */
/* The channel's one frame: a device or fd is read once (its fd left in *keep when asked,
 * else closed); a vsock listener accepts until a connection brings a whole frame (or
 * breaks the protocol). */
static int channel_frame(const char *chan, int greet, uint32_t *len, int *keep) {
    int got;
    if (!strncmp(chan, "vsock:", 6)) {
        int s = vsock_listen(chan + 6);
        if (s < 0) return s;
        do {
            int c = accept4(s, 0, 0, SOCK_CLOEXEC);
            if (c < 0) {
                if (errno == EINTR || errno == ECONNABORTED) { got = -CLOSED; continue; }
                got = -fail(1, "cannot accept on the vsock port", strerror(errno));
                break;
            }
            got = exchange(c, greet, len);
            close(c);
        } while (got == -CLOSED);
        close(s);
        return got;
    }
    int fd;
    if (!strncmp(chan, "fd:", 3)) {
        char *end;
        long n = strtol(chan + 3, &end, 10);
        if (chan[3] == 0 || *end || n < 0 || n > 1023) return -fail(2, "bad fd", chan);
        fd = (int)n;
    } else {
        fd = open(chan, O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) return -fail(1, chan, strerror(errno));
    }
    if (greet && write(fd, "HEL1\0\0\0\0", 8) != 8)
        return -fail(1, "cannot greet the host", strerror(errno));
    got = exchange(fd, 0, len);
    if (keep && got >= 0) *keep = fd;
    else close(fd);
    return got == -CLOSED ? -fail(2, "the control channel closed", 0) : got;
}

/* -- run: the settings applied, the workload started and watched ------------------------ */

/* A line on the console, as init.sh's say(). */
static void say(const char *fmt, const char *arg) {
    char line[512];
    int n = snprintf(line, sizeof line, "kiln-init: ");
    n += snprintf(line + n, sizeof line - (size_t)n, fmt, arg);
    if (n >= (int)sizeof line - 1) n = (int)sizeof line - 2;
    line[n++] = '\n';
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) { /* nothing else to tell it to */ }
        close(fd);
    }
}

/* The workload's own error (its stderr), as a runtime would say it; returns `code`. */
static int refuse(int code, const char *fmt, const char *arg) {
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    fflush(stderr);
    return code;
}

static int write_file(const char *path, const char *text, int flags) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | flags, 0644);
    if (fd < 0) return -1;
    size_t n = strlen(text);
    int rc = write(fd, text, n) == (ssize_t)n ? 0 : -1;
    return close(fd) < 0 ? -1 : rc;
}

/* /.kiln/busybox ip ARGS... (the network is set up only in runs that have one) */
static int ip(const char *a, const char *b, const char *c, const char *d, const char *e,
              const char *f) {
    pid_t p = fork();
    if (p == 0) {
        execl("/.kiln/busybox", "ip", a, b, c, d, e, f, (char *)0);
        _exit(127);
    }
    int ws;
    return p < 0 || waitpid(p, &ws, 0) < 0 || !WIFEXITED(ws) || WEXITSTATUS(ws) ? -1 : 0;
}

/* eth0 from the settings: the MAC, the address, up, the default route, resolv.conf. */
static void network(void) {
    const char *addr = st.val[IP], *gw = st.val[GW], *dns = st.val[DNS];
    struct stat sb;
    for (int i = 0; i < 200 && stat("/sys/class/net/eth0", &sb) < 0; i++) usleep(10000);
    if (*st.val[MAC] && ip("link", "set", "eth0", "address", st.val[MAC], 0) < 0)
        say("cannot set eth0's MAC %s", st.val[MAC]);
    if (ip("addr", "add", addr, "dev", "eth0", 0) == 0 &&
        ip("link", "set", "eth0", "up", 0, 0) == 0) {
        if (*gw && ip("route", "add", "default", "via", gw, 0) < 0)
            say("cannot add the route via %s", gw);
        say("eth0 %s", addr);
    } else {
        say("cannot configure eth0 with %s", addr);
    }
    if (!*dns || (access("/etc/resolv.conf", W_OK) < 0 && errno != ENOENT)) return;
    char text[1024];
    size_t n = 0;
    for (const char *d = dns; *d && n < sizeof text - 32;) {
        size_t l = strcspn(d, ",");
        n += (size_t)snprintf(text + n, sizeof text - n, "nameserver %.*s\n", (int)l, d);
        d += l + (d[l] == ',');
    }
    if (write_file("/etc/resolv.conf", text, O_TRUNC) < 0) { /* as init.sh: best effort */ }
}

/* The first line of FILE (passwd/group format) whose name or id is KEY: its id (field 3),
 * group id (field 4) and home (field 6) into `out` (copied); 0 found, -1 not. */
static int lookup(const char *file, const char *key, char out[3][256]) {
    FILE *f = fopen(file, "re");
    char line[1024];
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        char *fld[7] = {0}, *p = line;
        if (!strchr(line, '\n') && !feof(f)) {  /* longer than any real entry: skip it whole */
            int c;
            while ((c = getc(f)) != EOF && c != '\n') {}
            continue;
        }
        line[strcspn(line, "\n")] = 0;
        for (int i = 0; i < 7 && p; i++) {
            fld[i] = p;
            p = strchr(p, ':');
            if (p) *p++ = 0;
        }
        if (!fld[2] || (strcmp(fld[0], key) && strcmp(fld[2], key))) continue;
        snprintf(out[0], 256, "%s", fld[2]);
        snprintf(out[1], 256, "%s", fld[3] ? fld[3] : "");
        snprintf(out[2], 256, "%s", fld[5] ? fld[5] : "");
        fclose(f);
        return 0;
    }
    fclose(f);
    return -1;
}

static int numeric(const char *s) { return *s && strspn(s, "0123456789") == strlen(s); }

/* User (NAME|UID[:GROUP|GID]) → uid, gid, home, from the image's own files. */
static int resolve_user(uid_t *uid, gid_t *gid, char home[256]) {
    char user[256], fields[3][256], *group;
    if (strlen(st.val[USER]) >= sizeof user)
        return refuse(126, "kiln: unable to find user %.64s...: the name is too long",
                      st.val[USER]);
    snprintf(user, sizeof user, "%s", *st.val[USER] ? st.val[USER] : "0");
    group = strchr(user, ':');
    if (group) *group++ = 0;
    if (!*user) snprintf(user, sizeof user, "0");
    if (lookup("/etc/passwd", user, fields) == 0) {
        *uid = (uid_t)strtoul(fields[0], 0, 10);
        *gid = (gid_t)strtoul(fields[1], 0, 10);
        snprintf(home, 256, "%s", fields[2]);
    } else if (numeric(user)) {
        *uid = (uid_t)strtoul(user, 0, 10), *gid = 0;
        home[0] = 0;
    } else {
        return refuse(126, "kiln: unable to find user %s: no matching entries in passwd file",
                      user);
    }
    if (group && *group) {
        if (lookup("/etc/group", group, fields) == 0) *gid = (gid_t)strtoul(fields[0], 0, 10);
        else if (numeric(group)) *gid = (gid_t)strtoul(group, 0, 10);
        else return refuse(126, "kiln: unable to find group %s: no matching entries in group "
                           "file", group);
    }
    if (!*home) snprintf(home, 256, "/");
    return 0;
}

/* argv[0] on PATH (a regular executable file), as init.sh searched it; NULL: not found. */
static const char *find_prog(const char *cmd, char *buf, size_t size) {
    if (strchr(cmd, '/')) return cmd;
    for (const char *d = st.path; ; ) {
        size_t l = strcspn(d, ":");
        struct stat sb;
        if (l + 1 + strlen(cmd) < size) {  /* a longer candidate cannot be a path */
            snprintf(buf, size, "%.*s/%s", (int)l, d, cmd);
            if (stat(buf, &sb) == 0 && S_ISREG(sb.st_mode) && access(buf, X_OK) == 0)
                return buf;
        }
        if (!d[l]) return 0;
        d += l + 1;
    }
}

/* Everything before the workload: the machine, the user, the directory, the program. */
static int prepare(uid_t *uid, gid_t *gid, const char **prog) {
    static char home[256], home_env[262], found[4096];
    if (sethostname(st.val[HOSTNAME], strlen(st.val[HOSTNAME])) < 0)
        say("cannot set the hostname%s", "");
    struct stat sb;
    if (*st.val[MACHINE_ID] && stat("/etc", &sb) == 0 && S_ISDIR(sb.st_mode)) {
        char id[40];
        snprintf(id, sizeof id, "%s\n", st.val[MACHINE_ID]);
        if (write_file("/etc/machine-id", id, O_TRUNC) < 0) say("cannot write /etc/machine-id%s", "");
    }
    if (*st.val[IP]) network();
    int rc = resolve_user(uid, gid, home);
    if (rc) return rc;
    if (!st.has_home) {  /* HOME first, then the settings' env, as init.sh did */
        snprintf(home_env, sizeof home_env, "HOME=%s", home);
        memmove(st.env + 1, st.env, sizeof *st.env * (size_t)st.nenv++);
        st.env[0] = home_env;
    }
    st.env[st.nenv] = 0;
    st.args[st.nargs] = 0;
    if (*st.val[WORKDIR]) {
        char dir[4096];
        if (strlen(st.val[WORKDIR]) >= sizeof dir)
            return refuse(126, "kiln: cannot enter working directory %.64s...: too long",
                          st.val[WORKDIR]);
        snprintf(dir, sizeof dir, "%s", st.val[WORKDIR]);
        for (char *p = dir + 1; *p; p++)  /* mkdir -p, errors left to chdir */
            if (*p == '/') { *p = 0; mkdir(dir, 0755); *p = '/'; }
        mkdir(dir, 0755);
        if (chdir(dir) < 0)
            return refuse(126, "kiln: cannot enter working directory %s", st.val[WORKDIR]);
    }
    *prog = find_prog(st.args[0], found, sizeof found);
    if (!*prog) return refuse(127, "kiln: %s: executable file not found in $PATH", st.args[0]);
    if (!strcmp(st.val[STDIN], "0")) {  /* a warm run's stdin port is not the workload's */
        int fd = open("/dev/null", O_RDONLY);
        if (fd >= 0 && fd != 0) { dup2(fd, 0); close(fd); }
    }
    return 0;
}
static int status_code(int ws) { return WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws); }

/* A frame on the channel after the workload started: the grace of an STP1, else -1 (the
 * channel closed or broke the protocol: said, and no longer watched). */
static long stop_frame(int chan) {
    static const char *const tags[] = {"SET1", "STP1"};
    static const uint32_t limits[] = {SETTINGS_MAX, STOP_MAX};
    uint32_t len = 0;
    int got = read_frame(chan, tags, limits, 2, &len);
    if (got == 1 && len && strspn((char *)payload, "0123456789") == len)
        return strtol((char *)payload, 0, 10);
    if (got == 0) fail(2, "settings frame after the workload started", 0);
    else if (got == 1) fail(2, "bad stop request", (char *)payload);
    say("the control channel failed: no graceful stop%s", "");
    return -1;
}

/* Fork and exec the workload, then wait for it: SIGTERM or SIGINT to the agent (init.sh's
 * stop on Ctrl-Alt-Del) and an STP1 on `chan` are SIGTERM to the workload; an STP1's grace
 * later every process is SIGKILLed. Returns the workload's status as a shell gives it. */
static int run_workload(const char *prog, uid_t uid, gid_t gid, int chan) {
    sigset_t mask, old;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, &old);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) return refuse(126, "kiln: cannot watch the workload: %s", strerror(errno));
    say("starting %s", prog);
    pid_t child = fork();
    if (child < 0) return refuse(126, "kiln: cannot start the workload: %s", strerror(errno));
    if (child == 0) {  /* a background job of init.sh ignores SIGINT/SIGQUIT: not the workload */
        signal(SIGINT, SIG_DFL);
        signal(SIGQUIT, SIG_DFL);
        sigprocmask(SIG_SETMASK, &old, 0);
        if ((uid || gid) && (setgroups(0, 0) < 0 || setgid(gid) < 0 || setuid(uid) < 0))
            _exit(refuse(126, "kiln: cannot switch to the workload's user: %s",
                         strerror(errno)));
        execve(prog, st.args, st.env);
        int err = errno;
        fprintf(stderr, "kiln: cannot execute %s: %s\n", prog, strerror(err));
        _exit(err == ENOENT ? 127 : 126);
    }
    struct timespec now, kill_at = {0, 0};
    for (;;) {
        struct pollfd fds[2] = {{sfd, POLLIN, 0}, {chan, POLLIN, 0}};
        int wait_ms = -1;
        if (kill_at.tv_sec) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long ms = (kill_at.tv_sec - now.tv_sec) * 1000 + (kill_at.tv_nsec - now.tv_nsec) / 1000000;
            wait_ms = ms > 0 ? (int)ms : 0;
        }
        int n = poll(fds, chan >= 0 ? 2 : 1, wait_ms);
        if (n < 0 && errno != EINTR) return refuse(126, "kiln: poll: %s", strerror(errno));
        if (n == 0 && kill_at.tv_sec) {  /* the grace is over */
            kill(-1, SIGKILL);
            kill_at.tv_sec = 0;
        }
        if (n > 0 && fds[1].revents && chan >= 0) {
            long grace = stop_frame(chan);
            if (grace >= 0) {
                char text[24];
                snprintf(text, sizeof text, "%ld", grace);
                say("stop requested (grace %ss)", text);
                kill(child, SIGTERM);
                clock_gettime(CLOCK_MONOTONIC, &kill_at);
                kill_at.tv_sec += grace > 0 ? grace : 0;
                kill_at.tv_sec += !kill_at.tv_sec;
            }
            close(chan);
            chan = -1;
        }
        struct signalfd_siginfo si;
        if (n > 0 && fds[0].revents && read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
            if (si.ssi_signo != SIGCHLD) kill(child, SIGTERM);
            int ws;
            if (waitpid(child, &ws, WNOHANG) == child) return status_code(ws);
        }
    }
}

/* `run CHANNEL`: greet, take the settings, apply them, run and watch the workload. */
static int run(const char *chan_name) {
    uint32_t len = 0;
    int chan = -1;
    int got = channel_frame(chan_name, 1, &len, strncmp(chan_name, "vsock:", 6) ? &chan : 0);
    if (got == 1) {
        say("stop requested before the workload started%s", "");
        return 143;
    }
    if (got < 0 || parse_settings(len) || seed_crng(st.seed) || set_clock(st.when)) {
        say("no settings from the host (see the workload's stderr)%s", "");
        return 125;
    }
    uid_t uid;
    gid_t gid;
    const char *prog;
    int rc = prepare(&uid, &gid, &prog);
    return rc ? rc : run_workload(prog, uid, gid, chan);
}

int main(int argc, char **argv) {
    const char *mode = argc == 3 ? argv[1] : "";
    if (!strcmp(mode, "run")) return run(argv[2]);
    int greet = !strcmp(mode, "greet");
    if (!greet && strcmp(mode, "print"))
        return fail(2, "usage: agent run|greet|print CHANNEL", 0);
    uint32_t len = 0;
    int got = channel_frame(argv[2], greet, &len, 0);
    if (got < 0) return -got;
    if (got == 1) return 3;  /* STP1 instead of the settings */
    return parse_settings(len) ? 2 : print_settings();
}
