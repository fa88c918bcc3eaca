/* A job that maps FILE shared and writable but never writes it (a common
 * pattern: a memory-mapped table opened read-write "just in case"). FILE is
 * created with 4 KiB of content if it does not exist yet. The job records
 * FILE's mtime at start, then prints 0, 1, ... to stdout every INTERVAL_MS,
 * and after each step checks that FILE's mtime is unchanged to the
 * nanosecond; otherwise it exits 3 with "MTIME" on stderr. Exits 0 after
 * STEPS steps. The descriptor is closed after mmap: only the mapping holds
 * the file. Usage: mtime FILE STEPS INTERVAL_MS                           */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SIZE 4096

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: mtime FILE STEPS INTERVAL_MS\n");
		return 2;
	}
	long steps = atol(argv[2]), ms = atol(argv[3]);
	int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		perror(argv[1]);
		return 2;
	}
	if (st.st_size == 0) {
		char buf[SIZE];
		for (int i = 0; i < SIZE; i++)
			buf[i] = 'a' + i % 26;
		if (pwrite(fd, buf, SIZE, 0) != SIZE || fstat(fd, &st) != 0) {
			perror("write");
			return 2;
		}
	}
	volatile char *m = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	close(fd);
	struct timespec at_start = st.st_mtim;
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	long sum = 0;
	for (long i = 0; i < steps; i++) {
		sum += m[i % SIZE]; /* read only */
		printf("%ld\n", i);
		fflush(stdout);
		nanosleep(&ts, NULL);
		if (stat(argv[1], &st) != 0) {
			perror("stat");
			return 2;
		}
		if (st.st_mtim.tv_sec != at_start.tv_sec || st.st_mtim.tv_nsec != at_start.tv_nsec) {
			fprintf(stderr, "MTIME changed at step %ld: %ld.%09ld, was %ld.%09ld\n", i,
				(long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec, (long)at_start.tv_sec,
				at_start.tv_nsec);
			return 3;
		}
	}
	return sum == -1;
}
