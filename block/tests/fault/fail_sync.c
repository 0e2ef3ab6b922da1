/*
 * An LD_PRELOAD shim that makes one flush of one file fail with EIO, for the block layer's
 * fault-injection tests (block/tests/flush_failure.rs builds it with `cc`).
 *
 *   FAIL_SYNC_PATH  the file whose flushes count (as /proc/self/fd/N names it)
 *   FAIL_SYNC_NTH   which of its flushes fails (1 = the first)
 *   FAIL_SYNC_VIA   "libc" (fsync / fdatasync calls) or "io_uring" (IORING_OP_FSYNC)
 *
 * A flush through io_uring never passes through libc, so the shim follows the rings the
 * process makes: `io_uring_setup` (through libc's `syscall`, as the `io-uring` crate calls
 * it) gives the ring offsets, `mmap` of the ring descriptor gives the addresses, and before
 * each `io_uring_enter` the shim reads the submissions queued for the kernel and turns the
 * chosen IORING_OP_FSYNC into a no-op whose completion says -EIO
 * (IORING_NOP_INJECT_RESULT, Linux 6.10).
 *
 * Every flush the shim fails is reported on stderr as "fail_sync: injected EIO ...".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOP_INJECT_RESULT (1U << 0)
#define MAX_RINGS 64

struct ring {
    int fd;
    struct io_sqring_offsets sq_off;
    char *sq_ring;
    struct io_uring_sqe *sqes;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct ring rings[MAX_RINGS];
static int ring_count;
static int matching_flushes;

static long (*real_syscall)(long, ...);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);

static void resolve(void)
{
    if (!real_syscall) {
        real_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
        real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
        real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    }
}

static int via(const char *engine)
{
    const char *chosen = getenv("FAIL_SYNC_VIA");
    return chosen && strcmp(chosen, engine) == 0;
}

/* Whether `fd` names the target file. */
static int is_target(int fd)
{
    const char *target = getenv("FAIL_SYNC_PATH");
    char link[64], path[4096];
    if (!target || fd < 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len < 0)
        return 0;
    path[len] = '\0';
    return strcmp(path, target) == 0;
}

/* Counts a flush of `fd`; whether it is the one to fail. Call with `lock` held. */
static int count_and_choose(int fd)
{
    if (!is_target(fd))
        return 0;
    const char *nth = getenv("FAIL_SYNC_NTH");
    matching_flushes++;
    return matching_flushes == (nth ? atoi(nth) : 1);
}

static int sync_call(int fd, int (*real)(int), const char *name)
{
    resolve();
    if (via("libc")) {
        pthread_mutex_lock(&lock);
        int fail = count_and_choose(fd);
        pthread_mutex_unlock(&lock);
        if (fail) {
            fprintf(stderr, "fail_sync: injected EIO into %s(%d)\n", name, fd);
            errno = EIO;
            return -1;
        }
    }
    return real(fd);
}

int fsync(int fd) { return sync_call(fd, real_fsync, "fsync"); }
int fdatasync(int fd) { return sync_call(fd, real_fdatasync, "fdatasync"); }

static struct ring *find_ring(int fd)
{
    for (int i = 0; i < ring_count; i++)
        if (rings[i].fd == fd)
            return &rings[i];
    return NULL;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t offset)
{
    resolve();
    void *mapped = real_mmap(addr, len, prot, flags, fd, offset);
    if (mapped != MAP_FAILED && fd >= 0) {
        pthread_mutex_lock(&lock);
        struct ring *ring = find_ring(fd);
        if (ring && (unsigned long long)offset == IORING_OFF_SQ_RING)
            ring->sq_ring = mapped;
        else if (ring && (unsigned long long)offset == IORING_OFF_SQES)
            ring->sqes = mapped;
        pthread_mutex_unlock(&lock);
    }
    return mapped;
}

/* Rewrites the chosen IORING_OP_FSYNC among the submissions queued on `ring`. */
static void inject_into_queue(struct ring *ring)
{
    if (!ring->sq_ring || !ring->sqes)
        return;
    unsigned head = __atomic_load_n((unsigned *)(ring->sq_ring + ring->sq_off.head), __ATOMIC_ACQUIRE);
    unsigned tail = __atomic_load_n((unsigned *)(ring->sq_ring + ring->sq_off.tail), __ATOMIC_ACQUIRE);
    unsigned mask = *(unsigned *)(ring->sq_ring + ring->sq_off.ring_mask);
    unsigned *array = (unsigned *)(ring->sq_ring + ring->sq_off.array);
    for (unsigned at = head; at != tail; at++) {
        struct io_uring_sqe *sqe = &ring->sqes[array[at & mask]];
        if (sqe->opcode != IORING_OP_FSYNC || (sqe->flags & IOSQE_FIXED_FILE))
            continue;
        if (count_and_choose(sqe->fd)) {
            fprintf(stderr, "fail_sync: injected EIO into io_uring fsync(%d)\n", sqe->fd);
            sqe->opcode = IORING_OP_NOP;
            sqe->rw_flags = NOP_INJECT_RESULT;
            sqe->len = (unsigned)-EIO;
        }
    }
}

long syscall(long number, ...)
{
    va_list args;
    long a[6];
    va_start(args, number);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(args, long);
    va_end(args);
    resolve();
    if (number == SYS_io_uring_enter && via("io_uring")) {
        pthread_mutex_lock(&lock);
        struct ring *ring = find_ring((int)a[0]);
        if (ring)
            inject_into_queue(ring);
        pthread_mutex_unlock(&lock);
    }
    long result = real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
    if (number == SYS_io_uring_setup && result >= 0) {
        struct io_uring_params *params = (struct io_uring_params *)a[1];
        pthread_mutex_lock(&lock);
        /* A descriptor number of a closed ring may come back for a new one. */
        struct ring *ring = find_ring((int)result);
        if (!ring && ring_count < MAX_RINGS)
            ring = &rings[ring_count++];
        if (ring) {
            memset(ring, 0, sizeof *ring);
            ring->fd = (int)result;
            ring->sq_off = params->sq_off;
        }
        pthread_mutex_unlock(&lock);
    }
    return result;
}
