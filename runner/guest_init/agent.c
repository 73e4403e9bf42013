/* kiln-agent: the guest end of kiln's control channel (docs/run.md, "The control channel").
 *
 * Built static by scripts/install-deps.sh (gcc -static -Os; else by kiln on first use) and
 * written into every VM's snapshot as /.kiln/agent; run by /.kiln/init (init.sh) as root.
 *
 *   agent settings CHAN   send HEL1, read one frame: SET1 -> seed the kernel CRNG
 *                         (RNDADDENTROPY + RNDRESEEDCRNG), set CLOCK_REALTIME, print the
 *                         settings as shell assignments for init.sh; STP1 -> exit 3
 *   agent greet CHAN      as settings, but apply nothing (tests: the framing on a host)
 *   agent stop CHAN       read one frame: STP1 -> print its grace (seconds)
 *   agent print FILE      read one SET1 frame and print it, applying nothing (tests)
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
 * Exit status: 0 done, 1 a system call failed, 2 a protocol error (said on stderr),
 * 3 a stop request came instead of the settings.
 */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
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

/* Check every record, apply seed and time, then print the assignments init.sh evals. */
static int apply_settings(uint32_t len, int apply) {
    const char *val[NSCALARS] = {0}, *seed = 0, *when = 0, *path = 0;
    int nargs = 0, has_home = 0;
    if (len == 0 || payload[len - 1] != 0) return fail(2, "settings not NUL-terminated", 0);
    for (char *r = (char *)payload; r < (char *)payload + len; r += strlen(r) + 1) {
        char *eq = strchr(r, '=');
        if (!eq) return fail(2, "settings record without '='", r);
        *eq = 0;
        const char *v = eq + 1;
        size_t k = 0;
        while (k < NSCALARS && strcmp(r, SCALARS[k]) != 0) k++;
        if (k < NSCALARS) val[k] = v;
        else if (!strcmp(r, "seed")) seed = v;
        else if (!strcmp(r, "time")) when = v;
        else if (!strcmp(r, "arg")) nargs++;
        else if (!strcmp(r, "env")) {
            if (!strncmp(v, "PATH=", 5)) path = v + 5;
            if (!strncmp(v, "HOME=", 5)) has_home = 1;
        } else return fail(2, "unknown settings record", r);
        *eq = '=';
    }
    if (!seed || !when || !val[0] || !nargs) return fail(2, "settings incomplete", 0);
    int rc = apply ? seed_crng(seed) : 0;
    if (!rc && apply) rc = set_clock(when);
    if (rc) return rc;
    for (size_t k = 0; k < NSCALARS; k++) {
        printf("KILN_");
        for (const char *c = SCALARS[k]; *c; c++) putchar(*c >= 'a' ? *c - 32 : *c);
        putchar('=');
        quote(val[k] ? val[k] : "");
        putchar('\n');
    }
    printf("KILN_PATH=");
    quote(path ? path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    printf("\nKILN_HAS_HOME=%d\nset --", has_home);
    for (int pass = 0; pass < 2; pass++) {  /* ENV... -- ARGV... */
        const char *want = pass ? "arg=" : "env=";
        if (pass) fputs(" --", stdout);
        for (char *r = (char *)payload; r < (char *)payload + len; r += strlen(r) + 1) {
            if (strncmp(r, want, 4)) continue;
            putchar(' ');
            quote(r + 4);
        }
    }
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
static int channel_frame(const char *chan, int greet, uint32_t *len) {
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
    close(fd);
    return got == -CLOSED ? -fail(2, "the control channel closed", 0) : got;
}

int main(int argc, char **argv) {
    const char *mode = argc == 3 ? argv[1] : "";
    int settings = strcmp(mode, "stop") != 0, apply = !strcmp(mode, "settings");
    int greet = apply || !strcmp(mode, "greet");
    if (!greet && strcmp(mode, "stop") && strcmp(mode, "print"))
        return fail(2, "usage: agent settings|greet|stop|print CHANNEL", 0);
    uint32_t len = 0;
    int got = channel_frame(argv[2], greet, &len);
    if (got < 0) return -got;
    if (got == 1) {  /* STP1: the grace, digits only */
        if (len == 0 || strspn((char *)payload, "0123456789") != len)
            return fail(2, "bad stop request", (char *)payload);
        if (settings) return 3;
        printf("%s\n", payload);
        return 0;
    }
    if (!settings) return fail(2, "settings frame after the workload started", 0);
    return apply_settings(len, apply);
}
