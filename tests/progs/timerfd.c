/* A periodic timerfd (20 ms): it keeps firing, with its interval. */
#include "matrix.h"
#include <stdint.h>
#include <sys/timerfd.h>

int main(void)
{
	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
	CHECK(tfd >= 0 && timerfd_settime(tfd, 0, &its, NULL) == 0, "timerfd");
	ready();
	long n = 0;
	int done;
	do {
		uint64_t exp = 0;
		CHECK(timerfd_gettime(tfd, &its) == 0 && its.it_interval.tv_nsec == 20000000, "interval");
		CHECK(n == 0 || (read(tfd, &exp, 8) == 8 && exp >= 1),
		      "timerfd did not fire (it_value %ld.%09ld)", its.it_value.tv_sec, its.it_value.tv_nsec);
		done = step(&n);
	} while (!done);
	pass();
}
