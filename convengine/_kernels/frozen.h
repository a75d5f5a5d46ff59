/* What a split frozen program (frozen.pxi, run_split) needs beyond the kernels: its stage counters and a small
 * pool of worker threads of its own.
 *
 * Stages. Per stage, how many of its slices have been claimed and how many are done. Threads claim slices with an
 * atomic add, so a thread that arrives late (a worker still waking) finds the early stages done and goes on; a
 * stage is passed once all its slices are done, waited for by spinning: slices last microseconds, and a sleeping
 * waiter costs 30-50 us to wake under a hypervisor. The release/acquire pair makes a slice's output visible to
 * the threads of the next stage.
 *
 * Workers. Not an OpenMP team: each slice is a whole kernel call on one thread, and a kernel's one-thread parallel
 * block nested inside a team cost 2.6 us when both threads opened one at once (0.6 us alone, 0.34 us from plain
 * threads; AMD EPYC Zen 4, 2 vCPUs, libgomp 12), and an OpenMP region's end waits for every thread of the team,
 * also one still waking. A job here is posted to the workers and run by the caller at the same time; a worker
 * that has not entered by the time the caller is done never enters (the job is closed), so a call never waits
 * for a wake-up. Idle workers spin for ce_pool_spin_ns after their last job, then sleep on a condition variable.
 */
#ifndef CE_FROZEN_H
#define CE_FROZEN_H

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

static inline void ce_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int ce_stage_claim(int* claimed) {
    return __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
}

static inline void ce_stage_done(int* done) {
    __atomic_fetch_add(done, 1, __ATOMIC_RELEASE);
}

/* One poll of a wait: spin, and after about 100 us of polls yield the core instead: more threads than cores
 * (set_num_threads above the core count) must not spin against the thread they wait for. */
static inline void ce_backoff(int* polls) {
    if (*polls < 4096) {
        ce_pause();
        ++*polls;
    } else {
        sched_yield();
    }
}

static inline void ce_stage_wait(int* done, int n) {
    int polls = 0;
    while (__atomic_load_n(done, __ATOMIC_ACQUIRE) < n)
        ce_backoff(&polls);
}

static inline int ce_stage_failed(int* failed) {
    return __atomic_load_n(failed, __ATOMIC_RELAXED);
}

static inline void ce_stage_fail(int* failed) {
    __atomic_store_n(failed, 1, __ATOMIC_RELAXED);
}

/* ---- the pool ---------------------------------------------------------------------------------------------- */

#define CE_POOL_MAX 64

/* How long an idle worker spins before it sleeps (frozen.pxi's set_pool_spin sets it from the wait policy). */
static long long ce_pool_spin_ns = 200000LL;

typedef void (*ce_job_fn)(void* ctx);

static struct {
    pthread_mutex_t lock;           /* guards sleeping and the condition; taken to start workers */
    pthread_cond_t wake;
    int started;                    /* workers running */
    int sleeping;                   /* workers waiting on `wake` */
    int busy;                       /* a job is being run (one at a time; other callers run theirs alone) */
    unsigned seq;                   /* bumped when a job is posted */
    int state;                      /* bit 0: the job is open; higher bits: 2 x workers inside it */
    int wanted;                     /* workers the posted job may use */
    ce_job_fn fn;
    void* ctx;
} ce_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL, NULL};

static long long ce_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Enter the posted job if it is still open and wants worker `index`; 1 if entered. */
static int ce_pool_enter(int index) {
    int s = __atomic_load_n(&ce_pool.state, __ATOMIC_ACQUIRE);
    while ((s & 1) && index < __atomic_load_n(&ce_pool.wanted, __ATOMIC_RELAXED)) {
        if (__atomic_compare_exchange_n(&ce_pool.state, &s, s + 2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    }
    return 0;
}

static void* ce_pool_worker(void* arg) {
    int index = (int)(size_t)arg;
    unsigned seen = __atomic_load_n(&ce_pool.seq, __ATOMIC_ACQUIRE);
    for (;;) {
        long long spin_until = ce_now_ns() + __atomic_load_n(&ce_pool_spin_ns, __ATOMIC_RELAXED);
        int polls = 0;
        while (__atomic_load_n(&ce_pool.seq, __ATOMIC_ACQUIRE) == seen) {
            ce_pause();
            if (++polls == 64) {
                polls = 0;
                if (ce_now_ns() > spin_until) {
                    pthread_mutex_lock(&ce_pool.lock);
                    __atomic_add_fetch(&ce_pool.sleeping, 1, __ATOMIC_SEQ_CST);
                    while (__atomic_load_n(&ce_pool.seq, __ATOMIC_SEQ_CST) == seen)
                        pthread_cond_wait(&ce_pool.wake, &ce_pool.lock);
                    __atomic_sub_fetch(&ce_pool.sleeping, 1, __ATOMIC_SEQ_CST);
                    pthread_mutex_unlock(&ce_pool.lock);
                    break;
                }
            }
        }
        seen = __atomic_load_n(&ce_pool.seq, __ATOMIC_ACQUIRE);
        if (ce_pool_enter(index)) {
            ce_pool.fn(ce_pool.ctx);
            __atomic_sub_fetch(&ce_pool.state, 2, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void ce_pool_after_fork_in_child(void) {
    /* the workers do not exist in a forked child: start afresh (the engine runs a forked child on one thread) */
    pthread_mutex_init(&ce_pool.lock, NULL);
    pthread_cond_init(&ce_pool.wake, NULL);
    ce_pool.started = ce_pool.sleeping = ce_pool.busy = ce_pool.state = 0;
}

/* Start workers until `n` run (at most CE_POOL_MAX); how many run. */
static int ce_pool_start(int n) {
    static int fork_hook = 0;
    pthread_attr_t attr;
    pthread_t t;
    if (n > CE_POOL_MAX) n = CE_POOL_MAX;
    if (__atomic_load_n(&ce_pool.started, __ATOMIC_ACQUIRE) >= n) return n;
    pthread_mutex_lock(&ce_pool.lock);
    if (!fork_hook) {
        pthread_atfork(NULL, NULL, ce_pool_after_fork_in_child);
        fork_hook = 1;
    }
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (ce_pool.started < n) {
        if (pthread_create(&t, &attr, ce_pool_worker, (void*)(size_t)ce_pool.started) != 0) break;
        __atomic_add_fetch(&ce_pool.started, 1, __ATOMIC_RELEASE);
    }
    pthread_attr_destroy(&attr);
    n = ce_pool.started;
    pthread_mutex_unlock(&ce_pool.lock);
    return n;
}

/* Run fn(ctx) on the caller and on up to `workers` pool workers at once; returns when the caller's fn has
 * returned and every worker that entered has left. fn must finish the whole job on the caller alone if no worker
 * comes (the stages above do). Another job already running: the caller runs this one alone. */
static void ce_pool_run(ce_job_fn fn, void* ctx, int workers) {
    int polls;
    if (workers > 0) workers = ce_pool_start(workers);
    if (workers <= 0 || __atomic_exchange_n(&ce_pool.busy, 1, __ATOMIC_ACQUIRE)) {
        fn(ctx);
        return;
    }
    ce_pool.fn = fn;
    ce_pool.ctx = ctx;
    __atomic_store_n(&ce_pool.wanted, workers, __ATOMIC_RELAXED);
    __atomic_store_n(&ce_pool.state, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&ce_pool.seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ce_pool.sleeping, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&ce_pool.lock);
        pthread_cond_broadcast(&ce_pool.wake);
        pthread_mutex_unlock(&ce_pool.lock);
    }
    fn(ctx);
    /* close the job, then wait for the workers inside it (they are finishing its last stage or passing through) */
    __atomic_fetch_and(&ce_pool.state, ~1, __ATOMIC_ACQ_REL);
    polls = 0;
    while (__atomic_load_n(&ce_pool.state, __ATOMIC_ACQUIRE) != 0)
        ce_backoff(&polls);
    __atomic_store_n(&ce_pool.busy, 0, __ATOMIC_RELEASE);
}

static inline void ce_pool_set_spin(long long ns) {
    __atomic_store_n(&ce_pool_spin_ns, ns < 0 ? 0 : ns, __ATOMIC_RELAXED);
}

static inline int ce_pool_workers(void) {
    return __atomic_load_n(&ce_pool.started, __ATOMIC_ACQUIRE);
}

#endif
