/* An open, unlinked 100 KiB file (a CRIU "ghost" file, under its 1 MiB
 * default limit): content, size, offset and link count survive. */
#include "matrix.h"

#define SIZE (100 * 1024)
static char want[SIZE], got[SIZE];

static void check(int fd)
{
	struct stat st;
	CHECK(fstat(fd, &st) == 0 && st.st_size == SIZE && st.st_nlink == 0,
	      "size %ld nlink %ld", (long)st.st_size, (long)st.st_nlink);
	CHECK(pread(fd, got, SIZE, 0) == SIZE && memcmp(got, want, SIZE) == 0, "content differs");
	CHECK(lseek(fd, 0, SEEK_CUR) == 4321, "offset %ld", (long)lseek(fd, 0, SEEK_CUR));
}

int main(void)
{
	for (int i = 0; i < SIZE; i++)
		want[i] = (char)(i * 7 + i / 251);
	int fd = open("ghost.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0 && write(fd, want, SIZE) == SIZE, "write ghost.dat");
	CHECK(unlink("ghost.dat") == 0, "unlink");
	lseek(fd, 4321, SEEK_SET);
	check(fd);
	ready();
	long n = 0;
	while (!step(&n))
		check(fd);
	check(fd);
	CHECK(access("ghost.dat", F_OK) != 0, "ghost.dat reappeared in the directory");
	pass();
}
