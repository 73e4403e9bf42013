/* agent.h: what agent.c (the channel, the frames, the settings) and agentrun.c (the
 * `run` mode: the settings applied, the workload run and watched) share; one static
 * binary is built from both (runner/guest_init/agentbin.py, scripts/install-deps.sh). */
#ifndef KILN_AGENT_H
#define KILN_AGENT_H
#define _GNU_SOURCE /* accept4 */
#include <dirent.h>
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
#define CLOSED 100 /* read_frame: the channel closed before a whole header (not said) */
#define NSCALARS 9
enum { HOSTNAME, MACHINE_ID, WORKDIR, USER, MAC, IP, GW, DNS, STDIN };
#define MAX_WORDS (SETTINGS_MAX / 5 + 2) /* "arg=" + NUL: a record is >= 5 bytes */
#define ID_TEXT 4096                       /* a passwd field we keep: ids, home */

struct settings {
    const char *val[NSCALARS], *seed, *when, *path;
    int has_home, nargs, nenv;
    char *args[MAX_WORDS + 1], *env[MAX_WORDS + 2]; /* NULL-ended; env: room for HOME */
};

extern unsigned char payload[SETTINGS_MAX + 1]; /* the last frame's payload, NUL-ended */
extern struct settings st;                      /* parse_settings' index of a SET1 */

/* A frame header's payload length (bytes 4-7, big-endian). */
static inline uint32_t frame_len(const unsigned char *h) {
    return (uint32_t)h[4] << 24 | (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
}

int fail(int code, const char *what, const char *detail);
int channel_open(const char *chan);
int channel_read(int fd, int greet, uint32_t *len);
int channel_frame(const char *chan, int greet, uint32_t *len);
int parse_settings(uint32_t len, int timed);
int seed_crng(const char *hex);
int set_clock(const char *text);
int run(const char *chan_name); /* agentrun.c */

#endif
