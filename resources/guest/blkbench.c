/* fv-blkbench: block device throughput and IOPS from inside the guest.
 *
 * The benchmark ci/bench_blk.py runs it in the same guest on faultvisor and on
 * QEMU. Every transfer uses O_DIRECT, so each one is a virtio-blk request and the
 * guest's page cache plays no part:
 *   seq-write  MIB MiB in 1 MiB writes from offset 0, then fdatasync (a FLUSH)
 *   seq-read   the same MIB MiB in 1 MiB reads
 *   rand-read  4 KiB reads at random 4 KiB-aligned offsets inside those MIB MiB,
 *              one at a time (queue depth 1 per job), for SECONDS seconds, by
 *              JOBS threads at once
 * Output, one line each: FV-BLKBENCH <test> bytes=.. seconds=.. mbps=.. iops=..
 * Usage: fv-blkbench DEVICE MIB SECONDS JOBS
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)
#define SMALL 4096
#define MAX_JOBS 64

static int fd;
static uint64_t region;
static double seconds;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *test, uint64_t bytes, uint64_t ops, double secs)
{
    printf("FV-BLKBENCH %s bytes=%llu ops=%llu seconds=%.3f mbps=%.1f iops=%.0f\n", test,
           (unsigned long long)bytes, (unsigned long long)ops, secs,
           bytes / secs / 1e6, ops / secs);
    fflush(stdout);
}

static int sequential(int write, void *buf)
{
    double t0 = now();
    uint64_t ops = 0;
    for (uint64_t off = 0; off < region; off += BLOCK, ops++) {
        ssize_t n = write ? pwrite(fd, buf, BLOCK, off) : pread(fd, buf, BLOCK, off);
        if (n != BLOCK) {
            fprintf(stderr, "fv-blkbench: %s at %llu: %s\n", write ? "write" : "read",
                    (unsigned long long)off, n < 0 ? strerror(errno) : "short transfer");
            return 1;
        }
    }
    if (write && fdatasync(fd) != 0) {
        perror("fv-blkbench: fdatasync");
        return 1;
    }
    report(write ? "seq-write" : "seq-read", region, ops, now() - t0);
    return 0;
}

struct job {
    pthread_t thread;
    unsigned seed;
    uint64_t ops;
    int failed;
};

static void *random_reads(void *arg)
{
    struct job *j = arg;
    void *buf;
    if (posix_memalign(&buf, SMALL, SMALL) != 0) {
        j->failed = 1;
        return NULL;
    }
    uint64_t slots = region / SMALL;
    double end = now() + seconds;
    while (now() < end) {
        uint64_t r = ((uint64_t)rand_r(&j->seed) << 31) ^ (uint64_t)rand_r(&j->seed);
        if (pread(fd, buf, SMALL, (r % slots) * SMALL) != SMALL) {
            j->failed = 1;
            break;
        }
        j->ops++;
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: fv-blkbench DEVICE MIB SECONDS JOBS\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[2], NULL, 0);
    seconds = strtod(argv[3], NULL);
    int jobs = atoi(argv[4]);
    if (mib == 0 || seconds <= 0 || jobs < 1 || jobs > MAX_JOBS) {
        fprintf(stderr, "fv-blkbench: MIB > 0, SECONDS > 0 and 1 <= JOBS <= %d\n", MAX_JOBS);
        return 2;
    }
    fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) {
        perror("fv-blkbench: open");
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        perror("fv-blkbench: BLKGETSIZE64");
        return 1;
    }
    region = mib << 20;
    if (region > size) {
        fprintf(stderr, "fv-blkbench: %llu MiB asked, the device has %llu MiB\n",
                (unsigned long long)mib, (unsigned long long)(size >> 20));
        return 2;
    }
    void *buf;
    if (posix_memalign(&buf, SMALL, BLOCK) != 0) {
        fprintf(stderr, "fv-blkbench: out of memory\n");
        return 1;
    }
    memset(buf, 0x5a, BLOCK);
    if (sequential(1, buf) || sequential(0, buf))
        return 1;
    static struct job js[MAX_JOBS];
    double t0 = now();
    for (int i = 0; i < jobs; i++) {
        js[i].seed = 0x9e3779b9u * (i + 1);
        if (pthread_create(&js[i].thread, NULL, random_reads, &js[i]) != 0) {
            perror("fv-blkbench: pthread_create");
            return 1;
        }
    }
    uint64_t ops = 0;
    int failed = 0;
    for (int i = 0; i < jobs; i++) {
        pthread_join(js[i].thread, NULL);
        ops += js[i].ops;
        failed |= js[i].failed;
    }
    if (failed) {
        fprintf(stderr, "fv-blkbench: a random read failed\n");
        return 1;
    }
    char name[32];
    snprintf(name, sizeof(name), "rand-read-qd%d", jobs);
    report(name, ops * SMALL, ops, now() - t0);
    return 0;
}
