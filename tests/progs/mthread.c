/* Three threads taking turns under a pthread mutex and condition variable
 * (futexes); the main thread checks they keep going and joins them. */
#include "matrix.h"
#include <pthread.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long turn, count[3];
static int stop;

static void *worker(void *arg)
{
	long id = (long)arg;
	pthread_mutex_lock(&mu);
	while (!stop) {
		while (!stop && turn % 3 != id)
			pthread_cond_wait(&cv, &mu);
		if (stop)
			break;
		count[id]++;
		turn++;
		pthread_cond_broadcast(&cv);
		pthread_mutex_unlock(&mu);
		msleep(1);
		pthread_mutex_lock(&mu);
	}
	pthread_mutex_unlock(&mu);
	return (void *)id;
}

int main(void)
{
	pthread_t t[3];
	for (long i = 0; i < 3; i++)
		CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0, "pthread_create");
	ready();
	long n = 0, last = -1;
	int done;
	do {
		pthread_mutex_lock(&mu);
		long tu = turn, sum = count[0] + count[1] + count[2];
		int fair = count[0] - count[2] <= 1 && count[0] >= count[1] && count[1] >= count[2];
		pthread_mutex_unlock(&mu);
		CHECK(n == 0 || tu > last, "threads stopped at turn %ld", tu);
		CHECK(sum == tu && fair, "turns %ld, counts %ld %ld %ld", tu, count[0], count[1], count[2]);
		last = tu;
		done = step(&n);
	} while (!done);
	pthread_mutex_lock(&mu);
	stop = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	for (long i = 0; i < 3; i++) {
		void *r;
		CHECK(pthread_join(t[i], &r) == 0 && (long)r == i, "join %ld", i);
	}
	pass();
}
