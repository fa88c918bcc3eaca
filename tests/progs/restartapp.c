/* restartapp: an application that keeps its own restart file, as
 * simulation codes do (issue 25).
 *
 * Every 100 ms, step K: appends "step K\n" to out.dat (opened O_RDWR, not
 * O_APPEND: written at the end by lseek) and rewrites the header
 * "steps=%08d\n" at offset 0. Every 3 steps it writes restart.tmp with
 * "step=K size=S sum=H\n" (H: FNV-1a of out.dat's bytes after the header
 * up to S, read back from the file), fsyncs it and renames it over
 * restart.dat, printing "renamed K". At step 2 it creates scratch.txt.
 * When a file `go` exists, it removes `go` and scratch.txt, creates
 * late.txt and prints "acted K". Prints "step K" every step.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HDR 15

static uint64_t fnv(int fd, off_t from, off_t to) {
    uint64_t h = 1469598103934665603ULL;
    char buf[4096];
    for (off_t at = from; at < to;) {
        size_t want = (size_t)(to - at) < sizeof buf ? (size_t)(to - at) : sizeof buf;
        ssize_t n = pread(fd, buf, want, at);
        if (n <= 0) { perror("pread"); exit(1); }
        for (ssize_t i = 0; i < n; i++) { h ^= (unsigned char)buf[i]; h *= 1099511628211ULL; }
        at += n;
    }
    return h;
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) { perror(path); exit(1); }
    fsync(fd);
    close(fd);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int out = open("out.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (out < 0) { perror("out.dat"); return 1; }
    char line[128];
    snprintf(line, sizeof line, "steps=%08d\n", 0);
    if (pwrite(out, line, HDR, 0) != HDR) { perror("header"); return 1; }
    for (long k = 0;; k++) {
        int n = snprintf(line, sizeof line, "step %ld\n", k);
        off_t end = lseek(out, 0, SEEK_END);
        if (write(out, line, n) != n) { perror("append"); return 1; }
        snprintf(line, sizeof line, "steps=%08ld\n", k + 1);
        if (pwrite(out, line, HDR, 0) != HDR) { perror("header"); return 1; }
        (void)end;
        if (k == 2) write_file("scratch.txt", "scratch v1\n");
        if (access("go", F_OK) == 0) {
            unlink("go");
            unlink("scratch.txt");
            write_file("late.txt", "made after the checkpoint\n");
            printf("acted %ld\n", k);
        }
        if (k % 3 == 2) {
            off_t size = lseek(out, 0, SEEK_END);
            snprintf(line, sizeof line, "step=%ld size=%lld sum=%llu\n", k, (long long)size,
                     (unsigned long long)fnv(out, HDR, size));
            write_file("restart.tmp", line);
            if (rename("restart.tmp", "restart.dat") != 0) { perror("rename"); return 1; }
            printf("renamed %ld\n", k);
        }
        printf("step %ld\n", k);
        usleep(100000);
    }
}
