/* agentrun.c: kiln-agent's `run` mode (agent.c's header says what it does; docs/run.md,
 * "The control channel"): the settings applied, the workload started and watched. */
#include "agent.h"

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
    if (p == 0) {  /* its complaints are the console's, not the workload's stderr */
        int con = open("/dev/console", O_WRONLY | O_NOCTTY), nul = open("/dev/null", O_RDONLY);
        if (con >= 0) { dup2(con, 1); dup2(con, 2); }
        if (nul >= 0) dup2(nul, 0);
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
static int lookup(const char *file, const char *key, char out[3][ID_TEXT]) {
    FILE *f = fopen(file, "re");
    char *line = 0;
    size_t cap = 0;
    if (!f) return -1;
    while (getline(&line, &cap, f) > 0) {  /* any length: a group may list many members */
        char *fld[7] = {0}, *p = line;
        line[strcspn(line, "\n")] = 0;
        for (int i = 0; i < 7 && p; i++) {
            fld[i] = p;
            p = strchr(p, ':');
            if (p) *p++ = 0;
        }
        if (!fld[2] || (strcmp(fld[0], key) && strcmp(fld[2], key))) continue;
        const char *vals[3] = {fld[2], fld[3] ? fld[3] : "", fld[5] ? fld[5] : ""};
        int fits = 1;
        for (int i = 0; i < 3; i++) {
            fits &= strlen(vals[i]) < ID_TEXT;
            snprintf(out[i], ID_TEXT, "%s", vals[i]);
        }
        free(line);
        fclose(f);
        return fits ? 0 : -2;  /* -2: an entry too long to be real */
    }
    free(line);
    fclose(f);
    return -1;
}

static int numeric(const char *s) { return *s && strspn(s, "0123456789") == strlen(s); }

/* A uid or gid: decimal digits only, below 2^32 - 1 (the kernel's "no id"). */
static int parse_id(const char *text, unsigned *id) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (!numeric(text) || *end || errno || v >= 0xffffffffULL) return -1;
    *id = (unsigned)v;
    return 0;
}

static int bad_id(const char *what, const char *text) {
    char msg[160];
    snprintf(msg, sizeof msg, "kiln: invalid %s %%.64s: not a number below 4294967295", what);
    return refuse(126, msg, text);
}

/* User (NAME|UID[:GROUP|GID]) → uid, gid, home, from the image's own files. */
static int resolve_user(uid_t *uid, gid_t *gid, char home[ID_TEXT]) {
    char user[256], fields[3][ID_TEXT], *group;
    unsigned u, g;
    if (strlen(st.val[USER]) >= sizeof user)
        return refuse(126, "kiln: unable to find user %.64s...: the name is too long",
                      st.val[USER]);
    snprintf(user, sizeof user, "%s", *st.val[USER] ? st.val[USER] : "0");
    group = strchr(user, ':');
    if (group) *group++ = 0;
    if (!*user) snprintf(user, sizeof user, "0");
    int found = lookup("/etc/passwd", user, fields);
    if (found == 0) {
        if (parse_id(fields[0], &u) < 0) return bad_id("uid in /etc/passwd", fields[0]);
        if (parse_id(fields[1], &g) < 0) return bad_id("gid in /etc/passwd", fields[1]);
        snprintf(home, ID_TEXT, "%s", fields[2]);
    } else if (found == -1 && numeric(user)) {
        if (parse_id(user, &u) < 0) return bad_id("uid", user);
        g = 0;
        home[0] = 0;
    } else {
        return refuse(126, "kiln: unable to find user %s: no matching entries in passwd file",
                      user);
    }
    if (group && *group) {
        found = lookup("/etc/group", group, fields);
        if (found == 0) {
            if (parse_id(fields[0], &g) < 0) return bad_id("gid in /etc/group", fields[0]);
        } else if (found == -1 && numeric(group)) {
            if (parse_id(group, &g) < 0) return bad_id("gid", group);
        } else {
            return refuse(126, "kiln: unable to find group %s: no matching entries in group "
                          "file", group);
        }
    }
    if (!*home) snprintf(home, ID_TEXT, "/");
    *uid = (uid_t)u;
    *gid = (gid_t)g;
    return 0;
}

/* argv[0] on PATH (a regular executable file), as init.sh searched it; NULL: not found. */
static const char *find_prog(const char *cmd, char *buf, size_t size) {
    if (strchr(cmd, '/')) return cmd;
    for (const char *d = st.path; ; ) {
        size_t l = strcspn(d, ":");
        struct stat sb;
        if (l && l + 1 + strlen(cmd) < size) {  /* no empty entry; none too long */
            snprintf(buf, size, "%.*s/%s", (int)l, d, cmd);
            if (stat(buf, &sb) == 0 && S_ISREG(sb.st_mode) && access(buf, X_OK) == 0)
                return buf;
        }
        if (!d[l]) return 0;
        d += l + 1;
    }
}

/* /etc/machine-id, opened (made) before the hello: a restored guest then only writes it.
 * -1: the image has no /etc; -2: the open failed. Its size then: truncated only if longer
 * than an id (an ftruncate is one more ext4 path to translate in a restored guest). */
static int machine_id = -1;
static off_t machine_id_size;

/* A warm image's boot only (`kiln.warm` on the kernel command line): what every run's
 * settings are applied with is read before the hello, so a restored guest finds it in its
 * page cache instead of reading the disk through kernel paths the emulator translates
 * again — the user's files, the default PATH's directories (the program's lookup), the
 * image's shell. Measured on the demo image: ~20 ms less from the settings to the
 * workload's start (docs/warm.md). Files: regular ones only, at most 64 MiB each. */
static int warm_boot(void) {
    char line[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, line, sizeof line - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) return 0;
    line[n] = 0;
    for (char *w = strtok(line, " \n"); w; w = strtok(0, " \n"))
        if (!strcmp(w, "kiln.warm")) return 1;
    return 0;
}

static void warm_reads(void) {
    static const char *const files[] = {"/etc/passwd", "/etc/group", "/bin/sh"};
    static char buf[65536];
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        struct stat sb;  /* stat first: an image's /bin/sh -> /dev/... is never opened */
        if (stat(files[i], &sb) < 0 || !S_ISREG(sb.st_mode)) continue;
        int fd = open(files[i], O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) continue;
        if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode))
            for (off_t got = 0; got < (64 << 20);) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r <= 0) break;
                got += r;
            }
        close(fd);
    }
    /* guest_init.DEFAULT_PATH: the PATH of an image that sets none */
    char path[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char *d = strtok(path, ":"); d; d = strtok(0, ":")) {
        DIR *dir = opendir(d);
        if (!dir) continue;
        while (readdir(dir)) { /* every entry block read once */ }
        closedir(dir);
    }
}

/* Everything before the workload: the machine, the user, the directory, the program. */
static int prepare(uid_t *uid, gid_t *gid, const char **prog) {
    static char home[ID_TEXT], home_env[ID_TEXT + 5], found[4096];
    if (sethostname(st.val[HOSTNAME], strlen(st.val[HOSTNAME])) < 0)
        say("cannot set the hostname%s", "");
    if (*st.val[MACHINE_ID] && machine_id != -1) {  /* -1: the image has no /etc */
        char id[34];  /* 32 hex digits (parse_settings) and a newline */
        int n = snprintf(id, sizeof id, "%s\n", st.val[MACHINE_ID]);
        if (machine_id < 0 || n != 33 || pwrite(machine_id, id, 33, 0) != 33 ||
            (machine_id_size > 33 && ftruncate(machine_id, 33) < 0))
            say("cannot write /etc/machine-id%s", "");
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

#define GRACE_MAX 86400L /* s: a stop's grace is capped at a day */

/* Frames on the channel after the workload started, read without blocking (a frame that
 * arrives in pieces never stalls the watch over the workload): each call reads what
 * arrived into `in`; a whole STP1 gives its grace, -1 not yet, -2 the channel closed or
 * broke the protocol (said on the console, and no longer read). */
struct inbox { unsigned char buf[8 + STOP_MAX]; size_t got; };

static long stop_frame(int chan, struct inbox *in) {
    for (;;) {
        size_t want = 8;
        if (in->got >= 8) {
            uint32_t len = frame_len(in->buf);
            if (memcmp(in->buf, "STP1", 4) != 0) {
                say("the control channel sent %.4s after the workload started: no graceful "
                    "stop", (const char *)in->buf);
                return -2;
            }
            if (len == 0 || len > STOP_MAX) {
                say("the control channel sent a bad stop request: no graceful stop%s", "");
                return -2;
            }
            want = 8 + len;
        }
        if (in->got == want) {
            char text[STOP_MAX + 1];
            size_t n = want - 8;
            memcpy(text, in->buf + 8, n);
            text[n] = 0;
            in->got = 0;
            if (strspn(text, "0123456789") != n) {
                say("the control channel sent a bad stop request: no graceful stop%s", "");
                return -2;
            }
            errno = 0;
            long grace = strtol(text, 0, 10);
            return errno || grace > GRACE_MAX ? GRACE_MAX : grace;
        }
        ssize_t r = read(chan, in->buf + in->got, want - in->got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) return -1;
        if (r <= 0) {
            say("the control channel closed: no graceful stop%s", "");
            return -2;
        }
        in->got += (size_t)r;
    }
}

/* poll's timeout until `at` (NULL: none). */
static int wait_ms(const struct timespec *at) {
    if (!at) return -1;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(at->tv_sec - now.tv_sec) * 1000 +
                   (at->tv_nsec - now.tv_nsec) / 1000000;
    return ms <= 0 ? 0 : ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* The workload's process, forked before the hello: it takes the settings, applies them
 * and execs the workload (this process's stdin/stdout/stderr, every signal at its
 * default). Forked before, not after the settings: in a restored guest every kernel path
 * runs through the emulator's translator again, and a fork there cost ~14 ms. Returns
 * its exit status when it cannot exec: 125 no settings, 126/127 as prepare(), 143 a stop
 * request first. `chan`: the channel's fd, -1 for vsock (listened on here) and a file. */
static int workload(const char *chan_name, int chan, const sigset_t *old) {
    for (int sig = 1; sig < NSIG; sig++)  /* init.sh's background job ignores SIGINT/QUIT */
        signal(sig, SIG_DFL);
    sigprocmask(SIG_SETMASK, old, 0);
    struct stat sb;
    if (stat("/etc", &sb) == 0 && S_ISDIR(sb.st_mode)) {
        machine_id = open("/etc/machine-id", O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
        if (machine_id < 0) machine_id = -2;
        else machine_id_size = fstat(machine_id, &sb) == 0 ? sb.st_size : 34;
    }
    if (warm_boot()) warm_reads();
    uint32_t len = 0;
    int got = chan >= 0 ? channel_read(chan, 1, &len) : channel_frame(chan_name, 1, &len);
    if (got == 1 && len && strspn((char *)payload, "0123456789") == len) {
        say("stop requested before the workload started%s", "");
        return 143;
    }
    if (got == 1) fail(2, "bad stop request", (char *)payload);
    int bad = got != 0 || parse_settings(len, strncmp(chan_name, "file:", 5) != 0) ||
              seed_crng(st.seed) ||
              (st.when && set_clock(st.when));
    if (st.seed) explicit_bzero((char *)st.seed, strlen(st.seed));  /* no copy outlives use */
    if (bad) {
        say("no settings from the host (see the workload's stderr)%s", "");
        return 125;
    }
    uid_t uid;
    gid_t gid;
    const char *prog;
    int rc = prepare(&uid, &gid, &prog);
    if (rc) return rc;
    say("starting %s", prog);
    if ((uid || gid) && (setgroups(0, 0) < 0 || setgid(gid) < 0 || setuid(uid) < 0))
        return refuse(126, "kiln: cannot switch to the workload's user: %s", strerror(errno));
    execve(prog, st.args, st.env);
    int err = errno;
    fprintf(stderr, "kiln: cannot execute %s: %s\n", prog, strerror(err));
    return err == ENOENT ? 127 : 126;
}

/* Wait for the workload's process: SIGTERM or SIGINT from init (its stop on Ctrl-Alt-Del)
 * is SIGTERM to it; once it has exec'd (`gate` reads EOF; a byte: it failed before), an
 * STP1 on `chan` is SIGTERM to it and, the STP1's grace later, SIGKILL to every process.
 * Every other signal is held: a workload's `kill -1` (which PID 1, and before this the
 * init's own children, never received) must not end the run. Returns its status as a
 * shell gives it. */
static int watch(pid_t child, int chan, int gate, int sfd) {
    struct timespec kill_at;
    int armed = 0;  /* kill_at holds the end of a stop's grace */
    struct inbox in = {.got = 0};
    for (;;) {
        int other = gate >= 0 ? gate : chan;  /* the gate first, then the channel */
        struct pollfd fds[2] = {{sfd, POLLIN, 0}, {other, POLLIN, 0}};
        int n = poll(fds, other >= 0 ? 2 : 1, wait_ms(armed ? &kill_at : 0));
        if (n < 0 && errno != EINTR) return refuse(126, "kiln: poll: %s", strerror(errno));
        if (n == 0 && armed) {  /* the grace is over */
            kill(-1, SIGKILL);
            armed = 0;
        }
        if (n > 0 && other >= 0 && fds[1].revents && other == gate) {
            char b;
            ssize_t r = read(gate, &b, 1);
            if (r < 0 && errno == EINTR) continue;
            close(gate);
            gate = -1;
            if (r != 0) chan = -1;  /* it failed before its exec: the channel is not ours */
            else if (chan >= 0) fcntl(chan, F_SETFL, fcntl(chan, F_GETFL) | O_NONBLOCK);
        } else if (n > 0 && other >= 0 && fds[1].revents) {
            long grace = stop_frame(chan, &in);
            if (grace >= 0) {
                char text[24];
                snprintf(text, sizeof text, "%ld", grace);
                say("stop requested (grace %ss)", text);
                kill(child, SIGTERM);
                clock_gettime(CLOCK_MONOTONIC, &kill_at);
                kill_at.tv_sec += grace;
                armed = 1;
            }
            if (grace != -1) {  /* one stop, or a channel that failed: no more reads */
                close(chan);
                chan = -1;
            }
        }
        struct signalfd_siginfo si;
        if (n > 0 && fds[0].revents && read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
            if (si.ssi_signo != SIGCHLD && si.ssi_pid == 1) kill(child, SIGTERM);
            int ws;
            if (waitpid(child, &ws, WNOHANG) == child) return status_code(ws);
        }
    }
}

/* `run CHANNEL`: the workload's process forked, then watched. Every signal is held here
 * (watch() takes SIGCHLD, SIGTERM and SIGINT from a signalfd). */
int run(const char *chan_name) {
    int chan = -1;  /* vsock: the child listens; file: it reads; no stop requests either way */
    if (strncmp(chan_name, "vsock:", 6) && strncmp(chan_name, "file:", 5)) {
        chan = channel_open(chan_name);
        if (chan < 0) {
            say("no settings from the host (see the workload's stderr)%s", "");
            return 125;
        }
        fcntl(chan, F_SETFD, FD_CLOEXEC);  /* fd:N was inherited without it */
    }
    sigset_t all, watched, old;
    sigfillset(&all);
    sigemptyset(&watched);
    sigaddset(&watched, SIGCHLD);
    sigaddset(&watched, SIGTERM);
    sigaddset(&watched, SIGINT);
    sigprocmask(SIG_BLOCK, &all, &old);
    int gate[2], sfd = signalfd(-1, &watched, SFD_CLOEXEC);
    if (sfd < 0 || pipe2(gate, O_CLOEXEC) < 0)
        return refuse(126, "kiln: cannot watch the workload: %s", strerror(errno));
    pid_t child = fork();
    if (child < 0) return refuse(126, "kiln: cannot start the workload: %s", strerror(errno));
    if (child == 0) {
        close(sfd);
        close(gate[0]);
        int rc = workload(chan_name, chan, &old);
        if (write(gate[1], "x", 1) < 0) { /* the exit status says it all the same */ }
        _exit(rc);
    }
    close(gate[1]);
    return watch(child, chan, gate[0], sfd);
}
