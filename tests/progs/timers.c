/* A POSIX timer (timer_create, SIGRTMIN) and an itimer (ITIMER_REAL),
 * both periodic: they keep firing, with their intervals. */
#include "matrix.h"
#include <sys/time.h>

static volatile long rt, alrm;
static void on_rt(int s) { (void)s; rt++; }
static void on_alrm(int s) { (void)s; alrm++; }

int main(void)
{
	signal(SIGRTMIN, on_rt);
	signal(SIGALRM, on_alrm);
	struct sigevent sev = { .sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN };
	timer_t t;
	struct itimerspec its = { { 0, 10000000 }, { 0, 10000000 } };
	CHECK(timer_create(CLOCK_MONOTONIC, &sev, &t) == 0 && timer_settime(t, 0, &its, NULL) == 0,
	      "timer_create");
	struct itimerval itv = { { 0, 15000 }, { 0, 15000 } };
	CHECK(setitimer(ITIMER_REAL, &itv, NULL) == 0, "setitimer");
	ready();
	long n = 0, last_rt = -1, last_alrm = -1;
	int done;
	do {
		CHECK(n == 0 || (rt > last_rt && alrm > last_alrm), "timer stopped: rt %ld, alrm %ld", rt, alrm);
		last_rt = rt;
		last_alrm = alrm;
		done = step(&n);
	} while (!done);
	CHECK(timer_gettime(t, &its) == 0 && its.it_interval.tv_nsec == 10000000, "timer interval");
	CHECK(getitimer(ITIMER_REAL, &itv) == 0 && itv.it_interval.tv_usec == 15000, "itimer interval");
	printf("fired rt=%ld alrm=%ld\n", rt, alrm);
	pass();
}
