/* A hostile stand-in hypervisor that goes around the jail's seccomp filter
 * through the foreign system call ABIs of an x86_64 kernel: the 32-bit one
 * (int $0x80, AUDIT_ARCH_I386, i386 numbers) and x32 (the 64-bit entry with
 * the number's bit 30 set).  It makes the calls the jail refuses natively --
 * unshare/clone/clone3 into a new user namespace, ptrace attach and seize of
 * PID 1 (tini), pidfd_open(1), process_vm_readv(1, ...) -- plus getpid in
 * each ABI (any call at all) and two native controls, each in a forked child
 * of its own (a filter that kills takes only that child), and prints one line
 *
 *     FOREIGN-ABI {"attempt": "result", ...}
 *
 * on stdout, which is the console when svirt launches it as a UML kernel or
 * as qemu-system-x86_64.  A result is "ok: N" (the call returned N >= 0),
 * "errno: ENAME" or "killed: SIGNAME".  Then it waits for its stop (it exits
 * on SIGTERM; with "--once" at once); with a word containing "svirt.die" (a
 * UML word, or within QEMU's -append) it makes an i386 getpid itself on
 * SIGUSR1, which the jail's filter answers by killing it (else it exits 3).  "--only NAME..." makes only those
 * attempts.  The attempts on PID 1 refuse to run as root (EDOM): outside a
 * jail that would be the host's init.  Built by tests/hostile/foreign_abi.py as a static binary: the
 * jail holds no /etc and no loader path of its own.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define X32_BIT 0x40000000L
#define NEWUSER 0x10000000L /* CLONE_NEWUSER */
#define ALL_NS (NEWUSER | 0x00020000L | 0x20000000L | 0x40000000L | 0x08000000L | 0x04000000L)
/* ... CLONE_NEWNS, NEWPID, NEWNET, NEWIPC, NEWUTS */
#define PTRACE_ATTACH_ 16
#define PTRACE_DETACH_ 17
#define PTRACE_SEIZE_ 0x4206

/* i386 numbers (arch/x86/entry/syscalls/syscall_32.tbl) */
enum { I386_GETPID = 20, I386_PTRACE = 26, I386_CLONE = 120, I386_UNSHARE = 310,
       I386_PROCESS_VM_READV = 347, I386_PIDFD_OPEN = 434, I386_CLONE3 = 435 };
/* x32 numbers, bit 30 added below (syscall_64.tbl: "common" and "x32" rows) */
enum { X32_GETPID = 39, X32_CLONE = 56, X32_UNSHARE = 272, X32_PTRACE = 521,
       X32_PROCESS_VM_READV = 539, X32_PIDFD_OPEN = 434, X32_CLONE3 = 435 };

/* int $0x80 with up to six arguments: ebx, ecx, edx, esi, edi, ebp */
long i386_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6);
__asm__(
    ".text\n"
    ".globl i386_syscall\n"
    ".type i386_syscall, @function\n"
    "i386_syscall:\n"
    "  push %rbx\n"
    "  push %rbp\n"
    "  mov %rdi, %rax\n"
    "  mov %rsi, %rbx\n"
    "  mov %rcx, %r10\n"
    "  mov %rdx, %rcx\n"
    "  mov %r10, %rdx\n"
    "  mov %r8, %rsi\n"
    "  mov %r9, %rdi\n"
    "  mov 24(%rsp), %rbp\n"
    "  int $0x80\n"
    "  pop %rbp\n"
    "  pop %rbx\n"
    "  movslq %eax, %rax\n"
    "  ret\n");

/* the x32 (and native) entry: the number as is, errors as -errno */
static long raw_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

/* memory a 32-bit call can point at */
static unsigned char *low;

static long in_child_of_clone(long ret)
{
    if (ret == 0)
        _exit(0); /* the new process, in its new namespaces: gone at once */
    return ret;
}

/* a struct clone_args (VER0, 64 bytes) below 4 GiB */
static long clone3_args(void)
{
    uint64_t *args = (uint64_t *)(low + 256);
    memset(args, 0, 64);
    args[0] = NEWUSER;   /* flags */
    args[4] = SIGCHLD;   /* exit_signal */
    return (long)(uintptr_t)args;
}

/* PID 1's lowest mapping below 4 GiB (a 32-bit iovec reaches no other), else
 * an address that is not mapped: then EFAULT says the kernel let us at its
 * memory and found nothing there, EPERM/ESRCH that it did not let us */
static unsigned long pid1_low_address(void)
{
    FILE *f = fopen("/proc/1/maps", "r");
    unsigned long start = 0x10000, lo;
    char line[512];
    if (f == NULL)
        return start;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "%lx-", &lo) == 1 && lo < 0xffff0000UL) {
            start = lo;
            break;
        }
    fclose(f);
    return start;
}

static long vm_readv(int x32)
{
    uint32_t *iov = (uint32_t *)(low + 512); /* compat iovecs: {u32 base, u32 len} */
    iov[0] = (uint32_t)(uintptr_t)(low + 1024);
    iov[1] = 4;
    iov[2] = (uint32_t)pid1_low_address();
    iov[3] = 4;
    if (x32)
        return raw_syscall(X32_BIT | X32_PROCESS_VM_READV, 1, (long)(uintptr_t)iov, 1,
                           (long)(uintptr_t)(iov + 2), 1, 0);
    return i386_syscall(I386_PROCESS_VM_READV, 1, (long)(uintptr_t)iov, 1,
                        (long)(uintptr_t)(iov + 2), 1, 0);
}

/* after a successful attach: let PID 1 go again (it was sent SIGSTOP) */
static long after_attach(long ret)
{
    if (ret == 0) {
        int status;
        waitpid(1, &status, __WALL);
        raw_syscall(SYS_ptrace, PTRACE_DETACH_, 1, 0, 0, 0, 0);
    }
    return ret;
}

/* PTRACE_GETREGSET of a traced child of its own, as UML reads its guest
 * processes' FPU state: the byte count, or the error (UML's xstate filter
 * answers NT_X86_XSTATE with EIO) */
static long regset(long type)
{
    static unsigned char buf[65536];
    struct iovec iov = {buf, sizeof buf};
    int status;
    pid_t kid = fork();
    if (kid == 0) {
        raw_syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0, 0, 0);
        raise(SIGSTOP);
        _exit(0);
    }
    if (kid < 0)
        return -errno;
    waitpid(kid, &status, 0);
    long ret = raw_syscall(SYS_ptrace, 0x4204 /* PTRACE_GETREGSET */, kid, type, (long)&iov, 0, 0);
    kill(kid, SIGKILL);
    waitpid(kid, &status, 0);
    return ret == 0 ? (long)iov.iov_len : ret;
}

struct attempt {
    const char *name;
    int id;
};

static const struct attempt ATTEMPTS[] = {
    {"native getpid", 0},
    {"native unshare(CLONE_NEWUSER)", 1},
    {"native ptrace(GETREGSET, NT_PRSTATUS)", 2},
    {"native ptrace(GETREGSET, NT_X86_XSTATE)", 3},
    {"i386 getpid", 10},
    {"i386 unshare(CLONE_NEWUSER)", 11},
    {"i386 clone(CLONE_NEWUSER)", 12},
    {"i386 clone(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)", 13},
    {"i386 clone3(CLONE_NEWUSER)", 14},
    {"i386 ptrace(PTRACE_ATTACH, 1)", 15},
    {"i386 ptrace(PTRACE_SEIZE, 1)", 16},
    {"i386 pidfd_open(1)", 17},
    {"i386 process_vm_readv(1)", 18},
    {"x32 getpid", 20},
    {"x32 unshare(CLONE_NEWUSER)", 21},
    {"x32 clone(CLONE_NEWUSER)", 22},
    {"x32 clone(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)", 23},
    {"x32 clone3(CLONE_NEWUSER)", 24},
    {"x32 ptrace(PTRACE_ATTACH, 1)", 25},
    {"x32 ptrace(PTRACE_SEIZE, 1)", 26},
    {"x32 pidfd_open(1)", 27},
    {"x32 process_vm_readv(1)", 28},
};

static long run(int id)
{
    long x = X32_BIT;
    if (id % 10 >= 5 && getuid() == 0)
        return -EDOM; /* never at a real PID 1 as root (a run outside any jail) */
    switch (id) {
    case 0: return raw_syscall(SYS_getpid, 0, 0, 0, 0, 0, 0);
    case 1: return raw_syscall(SYS_unshare, NEWUSER, 0, 0, 0, 0, 0);
    case 2: return regset(1);
    case 3: return regset(0x202);
    case 10: return i386_syscall(I386_GETPID, 0, 0, 0, 0, 0, 0);
    case 11: return i386_syscall(I386_UNSHARE, NEWUSER, 0, 0, 0, 0, 0);
    case 12: return in_child_of_clone(i386_syscall(I386_CLONE, NEWUSER | SIGCHLD, 0, 0, 0, 0, 0));
    case 13: return in_child_of_clone(i386_syscall(I386_CLONE, ALL_NS | SIGCHLD, 0, 0, 0, 0, 0));
    case 14: return in_child_of_clone(i386_syscall(I386_CLONE3, clone3_args(), 64, 0, 0, 0, 0));
    case 15: return after_attach(i386_syscall(I386_PTRACE, PTRACE_ATTACH_, 1, 0, 0, 0, 0));
    case 16: return i386_syscall(I386_PTRACE, PTRACE_SEIZE_, 1, 0, 0, 0, 0);
    case 17: return i386_syscall(I386_PIDFD_OPEN, 1, 0, 0, 0, 0, 0);
    case 18: return vm_readv(0);
    case 20: return raw_syscall(x | X32_GETPID, 0, 0, 0, 0, 0, 0);
    case 21: return raw_syscall(x | X32_UNSHARE, NEWUSER, 0, 0, 0, 0, 0);
    case 22: return in_child_of_clone(raw_syscall(x | X32_CLONE, NEWUSER | SIGCHLD, 0, 0, 0, 0, 0));
    case 23: return in_child_of_clone(raw_syscall(x | X32_CLONE, ALL_NS | SIGCHLD, 0, 0, 0, 0, 0));
    case 24: return in_child_of_clone(raw_syscall(x | X32_CLONE3, clone3_args(), 64, 0, 0, 0, 0));
    case 25: return after_attach(raw_syscall(x | X32_PTRACE, PTRACE_ATTACH_, 1, 0, 0, 0, 0));
    case 26: return raw_syscall(x | X32_PTRACE, PTRACE_SEIZE_, 1, 0, 0, 0, 0);
    case 27: return raw_syscall(x | X32_PIDFD_OPEN, 1, 0, 0, 0, 0, 0);
    case 28: return vm_readv(1);
    }
    return -EINVAL;
}

static void result(int id, char *out, size_t size)
{
    int fds[2];
    if (pipe(fds) != 0) {
        snprintf(out, size, "stand-in error: pipe errno %d", errno);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        long ret;
        close(fds[0]);
        ret = run(id);
        if (write(fds[1], &ret, sizeof ret) != sizeof ret)
            _exit(2);
        _exit(0);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        snprintf(out, size, "stand-in error: fork errno %d", errno);
        return;
    }
    long ret = 0;
    ssize_t got = read(fds[0], &ret, sizeof ret);
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (got == sizeof ret) {
        if (ret >= 0)
            snprintf(out, size, "ok: %ld", ret);
        else
            snprintf(out, size, "errno: %s", strerrorname_np((int)-ret) ?: "unknown");
    } else if (WIFSIGNALED(status)) {
        snprintf(out, size, "killed: SIG%s", sigabbrev_np(WTERMSIG(status)) ?: "?");
    } else {
        snprintf(out, size, "stand-in error: child exit %d", WEXITSTATUS(status));
    }
}

static int wanted(int argc, char **argv, const char *name)
{
    int only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--only") == 0)
            only = 1;
        else if (only && strcmp(argv[i], name) == 0)
            return 1;
    }
    return !only;
}

/* the hypervisor itself, not a child: the filter kills it, and the
 * launcher's outcome must say SIGSYS */
static void die_now(int sig)
{
    static const char survived[] = "FOREIGN-ABI-SURVIVED\n";
    (void)sig;
    i386_syscall(I386_GETPID, 0, 0, 0, 0, 0, 0);
    if (write(1, survived, sizeof survived - 1) < 0)
        _exit(4);
    _exit(3);
}

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv)
{
    static char line[16384];
    size_t at = 0;
    int once = 0, die = 0;
    for (int i = 1; i < argc; i++) {
        once |= strcmp(argv[i], "--once") == 0;
        die |= strstr(argv[i], "svirt.die") != NULL; /* a UML word, or in QEMU's -append */
    }
    signal(SIGTERM, on_term);
    low = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT,
               -1, 0);
    if (low == MAP_FAILED) {
        printf("FOREIGN-ABI {\"stand-in error\": \"mmap MAP_32BIT errno %d\"}\n", errno);
        return 1;
    }
    at += snprintf(line + at, sizeof line - at, "FOREIGN-ABI {");
    for (size_t i = 0; i < sizeof ATTEMPTS / sizeof ATTEMPTS[0]; i++) {
        char out[128];
        if (!wanted(argc, argv, ATTEMPTS[i].name))
            continue;
        result(ATTEMPTS[i].id, out, sizeof out);
        at += snprintf(line + at, sizeof line - at, "%s\"%s\": \"%s\"", at > 13 ? ", " : "",
                       ATTEMPTS[i].name, out);
    }
    snprintf(line + at, sizeof line - at, "}\n");
    if (die) /* before the report: the test signals as soon as it reads it */
        signal(SIGUSR1, die_now);
    fputs(line, stdout);
    fflush(stdout);
    if (once)
        return 0;
    for (;;)
        pause();
}
