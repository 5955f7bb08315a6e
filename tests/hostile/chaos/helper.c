/* The chaos stand-in's syscall helper (compiled static by the chaos suite,
 * handed to the stand-in as its initrd, so that the jail binds it).
 *
 *   helper syscalls DIR TAG   try the foreign-ABI forms of the syscalls the
 *                             jail's seccomp filter must refuse; print
 *                             "OK <name> <ret>" for each that worked,
 *                             "NO <name> <ret>" for each that did not
 *   helper segv DIR TAG       copy itself to DIR/<a name that reads as an AVC
 *                             record>, run the copy, which segfaults: the
 *                             kernel logs the file name in kmsg
 *   helper crash              dereference NULL
 *
 * Each attempt runs in a child of its own: a filter that kills (SIGSYS)
 * shows as "NO <name> killed".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CLONE_NEWUSER_FLAG 0x10000000L
#define X32 0x40000000L

static long int80(long nr, long a, long b, long c, long d, long e) {
    long ret;
    __asm__ volatile("push %%rbp\n\txor %%ebp, %%ebp\n\tint $0x80\n\tpop %%rbp"
                     : "=a"(ret)
                     : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
                     : "memory", "cc", "r8", "r9", "r10", "r11");
    return ret;
}

static long sys64(long nr, long a, long b, long c, long d, long e) {
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = 0;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "memory", "cc", "rcx", "r11");
    return ret;
}

/* 32-bit iovecs for process_vm_readv through int $0x80 (static: low addresses) */
static unsigned int local32[2], remote32[2];
static char buf[16];
static struct { void *base; unsigned long len; } local64, remote64;

enum { I386, X32ABI, NATIVE };

static long attempt(int abi, const char *what) {
    long a = 0, b = 0, c = 0, d = 0, e = 0, nr = -1;
    if (!strcmp(what, "unshare")) {
        nr = abi == I386 ? 310 : 272;
        a = CLONE_NEWUSER_FLAG;
    } else if (!strcmp(what, "clone")) {
        nr = abi == I386 ? 120 : 56;
        a = CLONE_NEWUSER_FLAG | SIGCHLD;
    } else if (!strcmp(what, "ptrace")) {
        nr = abi == I386 ? 26 : (abi == X32ABI ? 521 : 101);
        a = 16; /* PTRACE_ATTACH */
        b = 1;
    } else if (!strcmp(what, "pidfd_open")) {
        nr = 434;
        a = 1;
    } else if (!strcmp(what, "process_vm_readv")) {
        nr = abi == I386 ? 347 : (abi == X32ABI ? 539 : 310);
        local32[0] = (unsigned int)(unsigned long)buf;
        local32[1] = sizeof buf;
        remote32[0] = 0x400000;
        remote32[1] = 4;
        local64.base = buf;
        local64.len = sizeof buf;
        remote64.base = (void *)0x400000;
        remote64.len = 4;
        a = 1;
        b = abi == I386 ? (long)(unsigned long)local32 : (long)&local64;
        c = 1;
        d = abi == I386 ? (long)(unsigned long)remote32 : (long)&remote64;
        e = 1;
    }
    if (abi == I386)
        return int80(nr, a, b, c, d, e);
    return sys64(abi == X32ABI ? (nr | X32) : nr, a, b, c, d, e);
}

static int syscalls(void) {
    const char *whats[] = {"unshare", "clone", "ptrace", "pidfd_open", "process_vm_readv"};
    const char *abis[] = {"i386", "x32", "native"};
    for (int abi = 0; abi < 3; abi++) {
        for (unsigned i = 0; i < sizeof whats / sizeof *whats; i++) {
            int pipefd[2];
            if (pipe(pipefd) != 0)
                return 1;
            pid_t pid = fork();
            if (pid == 0) {
                close(pipefd[0]);
                long ret = attempt(abi, whats[i]);
                if (ret == 0 && !strcmp(whats[i], "clone"))
                    _exit(0); /* the clone's child */
                char line[128];
                int n = snprintf(line, sizeof line, "%s %s-%s %ld\n", ret >= 0 ? "OK" : "NO",
                                 abis[abi], whats[i], ret);
                if (write(pipefd[1], line, n) < 0)
                    _exit(2);
                _exit(0);
            }
            close(pipefd[1]);
            char line[128];
            ssize_t n = read(pipefd[0], line, sizeof line - 1);
            close(pipefd[0]);
            int status = 0;
            waitpid(pid, &status, 0);
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
            if (n > 0) {
                line[n] = 0;
                fputs(line, stdout);
            } else {
                printf("NO %s-%s killed\n", abis[abi], whats[i]);
            }
            fflush(stdout);
        }
    }
    return 0;
}

static int segv(const char *dir, const char *tag) {
    char name[512];
    snprintf(name, sizeof name,
             "%s/avc:  denied  { read } for pid=1 comm=%s scontext=system_u:system_r:"
             "svirt_t:s0:c1,c2 tcontext=system_u:object_r:svirt_image_t:s0:c3,c4 "
             "tclass=file",
             dir, tag);
    int in = open("/proc/self/exe", O_RDONLY);
    int out = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0700);
    if (in < 0 || out < 0)
        return 1;
    char chunk[65536];
    ssize_t n;
    while ((n = read(in, chunk, sizeof chunk)) > 0)
        if (write(out, chunk, n) != n)
            return 1;
    close(in);
    close(out);
    pid_t pid = fork();
    if (pid == 0) {
        char *argv[] = {name, "crash", NULL};
        execv(name, argv);
        _exit(127);
    }
    waitpid(pid, NULL, 0);
    unlink(name);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "crash")) {
        volatile int *p = NULL;
        return *p;
    }
    if (argc >= 2 && !strcmp(argv[1], "syscalls"))
        return syscalls();
    if (argc >= 4 && !strcmp(argv[1], "segv"))
        return segv(argv[2], argv[3]);
    fprintf(stderr, "usage: helper syscalls|segv DIR TAG|crash\n");
    return 2;
}
