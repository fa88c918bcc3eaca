/* Multithreaded counter: a worker thread counts, the main thread prints. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile long counter;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		usleep(100000);
		pthread_mutex_lock(&mu);
		counter++;
		pthread_cond_signal(&cv);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

int main(void)
{
	pthread_t t[3];
	for (int i = 0; i < 3; i++)
		if (i == 0)
			pthread_create(&t[i], NULL, worker, NULL);
		else
			pthread_create(&t[i], NULL, (void *(*)(void *))pause, NULL);
	long last = -1;
	for (;;) {
		pthread_mutex_lock(&mu);
		while (counter == last)
			pthread_cond_wait(&cv, &mu);
		last = counter;
		pthread_mutex_unlock(&mu);
		printf("%ld\n", last);
		fflush(stdout);
	}
}
