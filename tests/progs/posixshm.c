/* POSIX shared memory (shm_open): a mapping of /dev/shm/NAME stays shared
 * with the named object (checked through a fresh shm_open + mmap). */
#include "matrix.h"
#include <sys/mman.h>

int main(void)
{
	char name[64];
	snprintf(name, sizeof name, "/supervise-matrix-%d-%ld", getpid(), (long)time(NULL));
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
	CHECK(fd >= 0 && ftruncate(fd, 16384) == 0, "shm_open %s", name);
	volatile long *a = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(a != MAP_FAILED, "mmap");
	close(fd);
	a[1000] = 0x5eed;
	ready();
	long n = 0;
	int done;
	do {
		a[0] = n;
		CHECK(a[1000] == 0x5eed, "pattern lost");
		done = step(&n);
	} while (!done);
	fd = shm_open(name, O_RDWR, 0);
	CHECK(fd >= 0, "shm_open %s again", name);
	volatile long *b = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(b != MAP_FAILED, "mmap again");
	CHECK(b[0] == n - 1 && b[1000] == 0x5eed, "object has %ld, mapping %ld", b[0], a[0]);
	b[2] = 77;
	CHECK(a[2] == 77, "old mapping no longer shared with the object");
	shm_unlink(name);
	pass();
}
