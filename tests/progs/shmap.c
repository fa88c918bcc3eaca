/* MAP_SHARED file mapping and MAP_SHARED|MAP_ANONYMOUS mapping shared with a
 * child: the child bumps a counter and mirrors what the parent writes. */
#include "matrix.h"
#include <sys/mman.h>

int main(void)
{
	int fd = open("map.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0 && ftruncate(fd, 8192) == 0, "map.dat");
	char *file = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	volatile long *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(file != MAP_FAILED && anon != MAP_FAILED, "mmap");
	anon[1] = anon[2] = -1;
	pid_t c = fork();
	if (c == 0) {
		for (;;) {
			anon[0]++;
			anon[2] = anon[1];
			msleep(2);
		}
	}
	ready();
	long n = 0, seen = -1;
	int done;
	do {
		char want[32], got[32] = "";
		snprintf(want, sizeof want, "step %ld", n);
		memcpy(file + 4096, want, strlen(want) + 1);
		CHECK(pread(fd, got, sizeof got, 4096) > 0 && strcmp(got, want) == 0,
		      "file mapping and file differ: %s / %s", want, got);
		CHECK(anon[0] > seen, "child stopped counting in the shared anon map (%ld)", anon[0]);
		seen = anon[0];
		CHECK(n == 0 || anon[2] == n - 1, "child did not mirror %ld (got %ld)", n - 1, anon[2]);
		anon[1] = n;
		done = step(&n);
	} while (!done);
	kill(c, SIGKILL);
	waitpid(c, NULL, 0);
	pass();
}
