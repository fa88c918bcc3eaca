/* Memory that checks itself, for lazy restores.
 * Usage: lazymem MB [THREADS] [CHILD] [FILEMAP]
 *
 * MB MiB of private anonymous memory hold a fixed pseudo-random pattern
 * (page k from seed k); 16 "dirty" pages are rewritten every iteration from
 * seed (iteration number), so consecutive checkpoints differ there. Every
 * 100 ms the main thread rewrites the dirty pages, checks all of its memory
 * (so a restored copy touches every page) and prints the iteration number.
 * THREADS threads check their share of the fixed pattern in a loop; with
 * CHILD a forked child checks its copy; with FILEMAP a 1 MiB MAP_SHARED
 * mapping of ./lazymem.map holds a pattern that is checked too. Any
 * mismatch prints "BAD ..." to stdout and exits 3 (the child: exits 3 and
 * the parent prints BAD when it sees that). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define DIRTY 16
static uint64_t *mem;
static size_t npages;
static uint8_t *fmap;

static uint64_t word(uint64_t seed, size_t j)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ull + j * 0xBF58476D1CE4E5B9ull + 1;
	x ^= x >> 31;
	x *= 0x94D049BB133111EBull;
	x ^= x >> 29;
	return x;
}

static void fill(uint64_t *p, uint64_t seed)
{
	for (size_t j = 0; j < 512; j++)
		p[j] = word(seed, j);
}

static int check(const uint64_t *p, uint64_t seed)
{
	for (size_t j = 0; j < 512; j++)
		if (p[j] != word(seed, j))
			return 0;
	return 1;
}

static void bad(const char *who, size_t page)
{
	printf("BAD %s page %zu\n", who, page);
	fflush(stdout);
	_exit(3);
}

static void check_fixed(const char *who, size_t from, size_t to)
{
	for (size_t k = from; k < to; k++)
		if (!check(mem + k * 512, 1000000 + k))
			bad(who, k);
}

static void *thread(void *arg)
{
	long t = (long)arg, n = (long)(size_t)arg >> 16;
	t &= 0xffff;
	size_t share = (npages - DIRTY) / n;
	for (;;) {
		check_fixed("thread", DIRTY + t * share, DIRTY + (t + 1) * share);
		usleep(50000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	long threads = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
	int child = argc > 3 ? atoi(argv[3]) : 0;
	int filemap = argc > 4 ? atoi(argv[4]) : 0;
	npages = (mb << 20) / 4096;
	mem = mmap(NULL, npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 1;
	for (size_t k = DIRTY; k < npages; k++)
		fill(mem + k * 512, 1000000 + k);
	if (filemap) {
		int fd = open("lazymem.map", O_RDWR | O_CREAT, 0600);
		if (fd < 0 || ftruncate(fd, 1 << 20))
			return 1;
		fmap = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (fmap == MAP_FAILED)
			return 1;
		for (size_t i = 0; i < (1 << 20); i++)
			fmap[i] = (uint8_t)(i * 7 + 3);
		close(fd);
	}
	pid_t kid = 0;
	if (child) {
		kid = fork();
		if (kid == 0) {
			for (;;) {
				check_fixed("child", DIRTY, npages);
				usleep(100000);
			}
		}
	}
	for (long t = 0; t < threads; t++) {
		pthread_t th;
		pthread_create(&th, NULL, thread, (void *)(t | (threads << 16)));
	}
	for (long i = 0;; i++) {
		for (size_t k = 0; k < DIRTY; k++)
			fill(mem + k * 512, (uint64_t)i * 64 + k);
		for (size_t k = 0; k < DIRTY; k++)
			if (!check(mem + k * 512, (uint64_t)i * 64 + k))
				bad("dirty", k);
		check_fixed("main", DIRTY, npages);
		if (fmap)
			for (size_t j = 0; j < (1 << 20); j++)
				if (fmap[j] != (uint8_t)(j * 7 + 3))
					bad("filemap", j / 4096);
		if (kid > 0) {
			int st;
			if (waitpid(kid, &st, WNOHANG) == kid)
				bad("child exited", 0);
		}
		printf("%ld\n", i);
		fflush(stdout);
		usleep(100000);
	}
}
