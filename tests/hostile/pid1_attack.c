/* A hostile stand-in hypervisor that goes for PID 1 of its jail (tini, which
 * runs as the guest's own uid) through /proc and signals, where the jail's
 * seccomp filter cannot look (it sees numbers, never paths):
 *
 *   open /proc/1/mem O_RDWR (and, where that works, pread of tini's first
 *   mapping, which is its ELF header: "ok: \x7fELF" says we hold tini's
 *   memory), open /proc/1/mem O_RDONLY, read /proc/1/environ, /proc/1/maps,
 *   /proc/1/auxv, list /proc/1/fd, readlink /proc/1/exe, /proc/1/cwd,
 *   /proc/1/root; kill(1, SIGKILL) and kill(1, SIGSTOP) (signals the init of
 *   a PID namespace has no handler for: dropped when sent from inside it),
 *   then whether PID 1 still lives and is not stopped ("state" of
 *   /proc/1/stat, which every uid may read); and, for the record only,
 *   prlimit of PID 1 (a same-uid check in the kernel: the seccomp filter refuses it).
 *
 * It prints one line on stdout (the console under svirt)
 *
 *     PID1-ATTACK {"attempt": "result", ...}
 *
 * a result being "ok: ..." or "errno: ENAME", then waits for its stop (exits
 * on SIGTERM; with "--once" at once).  It refuses to run as root, or when it
 * is not PID 2 of a PID namespace whose PID 1 is its parent: outside a jail
 * PID 1 is the host's init.  Built static by tests/hostile/test_pid1.py.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static char line[16384];
static size_t at;

static void add(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void add(const char *name, const char *fmt, ...)
{
    char value[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    for (char *p = value; *p; p++) /* keep the line JSON: no quotes, backslashes, controls */
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
            *p = '.';
    at += snprintf(line + at, sizeof line - at, "%s\"%s\": \"%s\"", at > 13 ? ", " : "",
                   name, value);
}

static void add_errno(const char *name, int err)
{
    add(name, "errno: %s", strerrorname_np(err) ?: "unknown");
}

/* the start of PID 1's first mapping (its executable), from /proc/1/maps */
static long first_mapping(void)
{
    FILE *f = fopen("/proc/1/maps", "r");
    unsigned long lo;
    long start = -1;
    if (f == NULL)
        return -1;
    if (fscanf(f, "%lx-", &lo) == 1)
        start = (long)lo;
    fclose(f);
    return start;
}

static void mem(const char *name, int flags)
{
    int fd = open("/proc/1/mem", flags | O_CLOEXEC);
    if (fd < 0) {
        add_errno(name, errno);
        return;
    }
    long start = first_mapping();
    unsigned char head[4] = {0};
    if (start >= 0 && pread(fd, head, sizeof head, start) == (ssize_t)sizeof head)
        add(name, "ok: %c%c%c%c at %#lx", head[0], head[1], head[2], head[3], start);
    else
        add(name, "ok: fd %d (pread: %s)", fd, start < 0 ? "no maps" : strerror(errno));
    close(fd);
}

static void slurp(const char *name, const char *path)
{
    char buf[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        add_errno(name, errno);
        return;
    }
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int err = errno;
    close(fd);
    if (n < 0) {
        add_errno(name, err);
        return;
    }
    buf[n] = 0;
    for (ssize_t i = 0; i < n; i++)
        if (buf[i] == 0)
            buf[i] = ' ';
    add(name, "ok: %zd bytes: %.60s", n, buf);
}

static void link_of(const char *name, const char *path)
{
    char target[256];
    ssize_t n = readlink(path, target, sizeof target - 1);
    if (n < 0) {
        add_errno(name, errno);
        return;
    }
    target[n] = 0;
    add(name, "ok: %s", target);
}

static void list_fds(void)
{
    DIR *d = opendir("/proc/1/fd");
    int n = 0;
    if (d == NULL) {
        add_errno("list /proc/1/fd", errno);
        return;
    }
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    add("list /proc/1/fd", "ok: %d entries", n);
}

static void signal_pid1(const char *name, int sig)
{
    if (kill(1, sig) != 0)
        add_errno(name, errno);
    else
        add(name, "ok: sent");
}

/* "alive: R" (the state letter of /proc/1/stat) or "gone" */
static void pid1_state(void)
{
    char buf[512];
    struct timespec pause = {0, 200 * 1000 * 1000};
    nanosleep(&pause, NULL); /* a delivered signal has acted by now */
    int fd = open("/proc/1/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0) {
        add("pid 1 after the signals", "gone: %s", strerror(errno));
        return;
    }
    buf[n] = 0;
    char *paren = strrchr(buf, ')');
    add("pid 1 after the signals", "alive: %c", paren && paren[1] ? paren[2] : '?');
}

/* prlimit asks the kernel for the same uid only (not dumpability): the jail's
 * seccomp filter refuses it on pid 1, a read or a change */
static void limits_of_pid1(void)
{
    struct rlimit r;
    if (prlimit(1, RLIMIT_NOFILE, NULL, &r) != 0)
        add_errno("prlimit(1, RLIMIT_NOFILE) read", errno);
    else
        add("prlimit(1, RLIMIT_NOFILE) read", "ok: %lu/%lu", (unsigned long)r.rlim_cur,
            (unsigned long)r.rlim_max);
    struct rlimit low = {1, 1};
    if (prlimit(1, RLIMIT_CPU, &low, NULL) != 0)
        add_errno("prlimit(1, RLIMIT_CPU) lowered", errno);
    else
        add("prlimit(1, RLIMIT_CPU) lowered", "ok");
}

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv)
{
    int once = argc > 1 && strcmp(argv[argc - 1], "--once") == 0;
    signal(SIGTERM, on_term);
    at = (size_t)snprintf(line, sizeof line, "PID1-ATTACK {");
    if (getuid() == 0 || geteuid() == 0 || getpid() != 2 || getppid() != 1) {
        add("stand-in refused", "uid %d pid %d ppid %d: not in a jail", (int)getuid(),
            (int)getpid(), (int)getppid());
    } else {
        mem("open /proc/1/mem O_RDWR", O_RDWR);
        mem("open /proc/1/mem O_RDONLY", O_RDONLY);
        slurp("read /proc/1/environ", "/proc/1/environ");
        slurp("read /proc/1/maps", "/proc/1/maps");
        slurp("read /proc/1/auxv", "/proc/1/auxv");
        list_fds();
        link_of("readlink /proc/1/exe", "/proc/1/exe");
        link_of("readlink /proc/1/cwd", "/proc/1/cwd");
        link_of("readlink /proc/1/root", "/proc/1/root");
        signal_pid1("kill(1, SIGKILL)", SIGKILL);
        signal_pid1("kill(1, SIGSTOP)", SIGSTOP);
        pid1_state();
        limits_of_pid1();
    }
    snprintf(line + at, sizeof line - at, "}\n");
    fputs(line, stdout);
    fflush(stdout);
    if (once)
        return 0;
    for (;;)
        pause();
}
