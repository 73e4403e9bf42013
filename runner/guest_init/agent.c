/* kiln-agent: the guest end of kiln's control channel (docs/run.md, "The control channel").
 *
 * Built static by scripts/install-deps.sh (gcc -static -Os; else by kiln on first use) and
 * written into every VM's snapshot as /.kiln/agent; run by /.kiln/init (init.sh) as root.
 *
 *   agent run CHAN     fork first (before the hello: agentrun.c says why). The child
 *                      (a warm image's boot, `kiln.warm` on the kernel command line:
 *                      after reading what runs need into the page cache) sends HEL1
 *                      and reads one frame. SET1: seed the kernel CRNG
 *                      (RNDADDENTROPY + RNDRESEEDCRNG), set CLOCK_REALTIME, the hostname,
 *                      /etc/machine-id and eth0 (busybox ip), resolve the user in the
 *                      image's /etc/passwd and /etc/group, enter the workdir, find argv[0]
 *                      on PATH, then exec the workload (this process's stdin/stdout/stderr,
 *                      the settings' environment only, every signal at its default). The
 *                      parent waits for it: SIGTERM/SIGINT from PID 1 (init.sh's stop on
 *                      Ctrl-Alt-Del) and an STP1 on CHAN are SIGTERM to the workload,
 *                      SIGKILL to every process an STP1's grace later; other signals are
 *                      held (a workload's `kill -1` is not for it). Exits with the
 *                      workload's status (128+N for a signal); its own errors: 125 (no
 *                      settings), 126 (user, ids, workdir, exec, as a container runtime: a
 *                      script without `#!` is an exec format error), 127 (not found), 143
 *                      (STP1 first).
 *   agent greet CHAN   as run up to the frame, then print it as shell assignments and
 *                      apply nothing (tests: the framing on a host)
 *   agent print FILE   read one SET1 frame and print it likewise (tests)
 *
 * Everything after the settings is done here, not by init.sh: after a
 * warm restore every code path runs through the emulator's translator again, and the
 * shell's parsing, its builtins' one-byte reads and a second exec cost ~120 ms there.
 *
 * CHAN is the virtio-serial port's device (QEMU), `vsock:PORT` (Firecracker: listen on
 * that AF_VSOCK port; the host connects through Firecracker's hybrid vsock), `file:PATH`
 * (a SET1 frame kiln wrote on the disk of a cold Firecracker run, where no channel is up
 * before the guest boots: read without a hello, then removed; a frame without `time`
 * leaves the clock alone) or `fd:N` (an inherited connected socket: tests). On vsock the
 * host may connect more than once: a connection that closes before a whole frame arrived
 * (the host gave up, or a restored snapshot's transport reset cut the one the hello went
 * out on) is dropped and the next one accepted, which is greeted again. Only a frame that
 * breaks the protocol ends it.
 *
 * A frame is a 4-byte tag, a 4-byte big-endian length and the payload; each tag has a
 * hard limit checked before its payload is read, so the guest never reads unbounded data.
 * greet/print exit status: 0 done, 1 a system call failed, 2 a protocol error (said on
 * stderr), 3 a stop request came instead of the settings.
 */
#include "agent.h"

unsigned char payload[SETTINGS_MAX + 1];

int fail(int code, const char *what, const char *detail) {
    fprintf(stderr, "kiln-agent: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return code;
}

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
    *len = frame_len(h);
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

int seed_crng(const char *hex) {
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

int set_clock(const char *text) {
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
_Static_assert(sizeof SCALARS / sizeof *SCALARS == NSCALARS, "SCALARS and agent.h agree");

struct settings st;

static int hex32(const char *s) {
    return strlen(s) == 32 && strspn(s, "0123456789abcdef") == 32;
}

/* Check every record of the SET1 payload and index it in `st` (the payload is kept).
 * `timed`: a `time` record is required (not in a frame on the disk: docs/run.md). */
int parse_settings(uint32_t len, int timed) {
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
    if (!st.seed || (timed && !st.when) || !st.val[HOSTNAME] || !st.nargs)
        return fail(2, "settings incomplete", 0);
    if (st.val[MACHINE_ID] && *st.val[MACHINE_ID] && !hex32(st.val[MACHINE_ID]))
        return fail(2, "machine id is not 32 hex digits", 0);
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

/* The hello: on a socket without SIGPIPE (a peer that gave up must not kill the process:
 * on vsock the next connection is accepted), elsewhere (the QEMU port) a plain write. */
static int hello(int fd) {
    ssize_t n = send(fd, "HEL1\0\0\0\0", 8, MSG_NOSIGNAL);
    if (n < 0 && errno == ENOTSOCK) n = write(fd, "HEL1\0\0\0\0", 8);
    return n == 8 ? 0 : -1;
}

/* One exchange on `fd`: greet (when asked) and read one frame. */
static int exchange(int fd, int greet, uint32_t *len) {
    static const char *const tags[] = {"SET1", "STP1"};
    static const uint32_t limits[] = {SETTINGS_MAX, STOP_MAX};
    if (greet && hello(fd) < 0) return -CLOSED;
    return read_frame(fd, tags, limits, 2, len);
}

/* The channel's fd: the device opened, or `fd:N` checked; negative: an error (said). */
int channel_open(const char *chan) {
    if (!strncmp(chan, "fd:", 3)) {
        char *end;
        long n = strtol(chan + 3, &end, 10);
        if (chan[3] == 0 || *end || n < 0 || n > 1023) return -fail(2, "bad fd", chan);
        return (int)n;
    }
    int fd = open(chan, O_RDWR | O_CLOEXEC | O_NOCTTY);
    return fd < 0 ? -fail(1, chan, strerror(errno)) : fd;
}

/* Greet (when asked) on an open channel and read its one frame. */
int channel_read(int fd, int greet, uint32_t *len) {
    if (greet && hello(fd) < 0) return -fail(1, "cannot greet the host", strerror(errno));
    int got = exchange(fd, 0, len);
    return got == -CLOSED ? -fail(2, "the control channel closed", 0) : got;
}

/* The channel's one frame: a device or fd is opened, read once and closed; a vsock
 * listener accepts until a connection brings a whole frame (or breaks the protocol);
 * `file:PATH` (a cold Firecracker run's settings, written on its disk) is read without a
 * greeting and removed: the seed in it is not the workload's to read. */
int channel_frame(const char *chan, int greet, uint32_t *len) {
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
    if (!strncmp(chan, "file:", 5)) {  /* a frame on the disk: read once, then removed */
        int fd = open(chan + 5, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) return -fail(1, chan + 5, strerror(errno));
        got = channel_read(fd, 0, len);
        static const char zeros[512];  /* the seed's blocks zeroed, not only unlinked */
        struct stat sb;
        off_t size = fstat(fd, &sb) == 0 ? sb.st_size : 0;
        for (off_t at = 0; at < size; at += (off_t)sizeof zeros)
            if (pwrite(fd, zeros, sizeof zeros, at) < 0) break;
        fdatasync(fd);
        close(fd);
        if (unlink(chan + 5) < 0)
            return -fail(1, "cannot remove the settings file", strerror(errno));
        return got;
    }
    int fd = channel_open(chan);
    if (fd < 0) return fd;
    got = channel_read(fd, greet, len);
    close(fd);
    return got;
}

int main(int argc, char **argv) {
    const char *mode = argc == 3 ? argv[1] : "";
    if (!strcmp(mode, "run")) return run(argv[2]);
    int greet = !strcmp(mode, "greet");
    if (!greet && strcmp(mode, "print"))
        return fail(2, "usage: agent run|greet|print CHANNEL", 0);
    uint32_t len = 0;
    int got = channel_frame(argv[2], greet, &len);
    if (got < 0) return -got;
    if (got == 1) return 3;  /* STP1 instead of the settings */
    return parse_settings(len, strncmp(argv[2], "file:", 5) != 0) ? 2 : print_settings();
}
