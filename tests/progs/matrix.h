/* Shared by the coverage matrix programs (tests/coverage.rs): set up a
 * kernel object, print READY, then one step every ~50 ms (check, print the
 * step number) until the test creates the file "go" after the restore;
 * then final checks and PASS (exit 0), or "FAIL: why" (exit 1). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FAIL(...)                                   \
	do {                                        \
		printf("FAIL: " __VA_ARGS__);       \
		printf(" (errno %d)\n", errno);     \
		fflush(stdout);                     \
		exit(1);                            \
	} while (0)
#define CHECK(c, ...)                   \
	do {                            \
		if (!(c))               \
			FAIL(__VA_ARGS__); \
	} while (0)

static void ready(void)
{
	printf("READY\n");
	fflush(stdout);
}

/* Sleeps ms milliseconds, whatever signals arrive meanwhile. */
static void msleep(long ms)
{
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&t, &t) != 0 && errno == EINTR)
		;
}

/* Prints step *n, sleeps 50 ms; true once "go" exists. */
static int step(long *n)
{
	printf("%ld\n", (*n)++);
	fflush(stdout);
	msleep(50);
	return access("go", F_OK) == 0;
}

static void pass(void)
{
	printf("PASS\n");
	fflush(stdout);
	exit(0);
}
