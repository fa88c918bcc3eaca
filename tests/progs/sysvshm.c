/* SysV shared memory: a segment attached twice; writes through one
 * attachment show through the other, and the id still names it. */
#include "matrix.h"
#include <sys/shm.h>

int main(void)
{
	int id = shmget(IPC_PRIVATE, 16384, IPC_CREAT | 0600);
	CHECK(id >= 0, "shmget");
	char *a = shmat(id, NULL, 0), *b = shmat(id, NULL, 0);
	CHECK(a != (void *)-1 && b != (void *)-1 && a != b, "shmat");
	strcpy(a + 8192, "sysv pattern");
	ready();
	long n = 0;
	int done;
	do {
		struct shmid_ds ds;
		CHECK(shmctl(id, IPC_STAT, &ds) == 0 && ds.shm_segsz == 16384, "IPC_STAT on id %d", id);
		CHECK(ds.shm_nattch == 2, "nattch %ld", (long)ds.shm_nattch);
		CHECK(strcmp(b + 8192, "sysv pattern") == 0, "pattern lost");
		((volatile long *)a)[0] = n;
		CHECK(((volatile long *)b)[0] == n, "attachments no longer share memory");
		done = step(&n);
	} while (!done);
	char *c = shmat(id, NULL, SHM_RDONLY);
	CHECK(c != (void *)-1 && strcmp(c + 8192, "sysv pattern") == 0, "re-attach by id");
	shmdt(a);
	shmdt(b);
	shmdt(c);
	shmctl(id, IPC_RMID, NULL);
	pass();
}
