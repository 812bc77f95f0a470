/* Counts the bytes a process holds from malloc and its relatives, and the peak since the last reset: CPU
 * tensors come from malloc (posix_memalign), so this is the CPU counterpart of torch.cuda's peak memory.
 * Preloaded into a benchmark worker (cpu_peak_memory.py); cpu_peak_reset / cpu_peak_get are read through
 * ctypes. Memory taken with mmap directly (thread stacks) is not counted. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);

static _Atomic long held = 0, peak = 0;

static void* track(void* p) {
  if (p) {
    const long now = atomic_fetch_add(&held, (long)malloc_usable_size(p)) + (long)malloc_usable_size(p);
    long seen = atomic_load(&peak);
    while (now > seen && !atomic_compare_exchange_weak(&peak, &seen, now)) {}
  }
  return p;
}
static void untrack(void* p) {
  if (p) atomic_fetch_sub(&held, (long)malloc_usable_size(p));
}

void* malloc(size_t n) { return track(__libc_malloc(n)); }
void* calloc(size_t count, size_t n) { return track(__libc_calloc(count, n)); }
void* memalign(size_t align, size_t n) { return track(__libc_memalign(align, n)); }
void* aligned_alloc(size_t align, size_t n) { return track(__libc_memalign(align, n)); }
void free(void* p) {
  untrack(p);
  __libc_free(p);
}
void* realloc(void* old, size_t n) {
  const long before = old ? (long)malloc_usable_size(old) : 0;
  void* p = __libc_realloc(old, n);
  if (!p) return NULL;  /* old is still held */
  atomic_fetch_sub(&held, before);
  return track(p);
}
int posix_memalign(void** out, size_t align, size_t n) {
  void* p = __libc_memalign(align, n);
  if (!p) return 12; /* ENOMEM */
  *out = track(p);
  return 0;
}

long cpu_peak_reset(void) {
  const long now = atomic_load(&held);
  atomic_store(&peak, now);
  return now;
}
long cpu_peak_get(void) { return atomic_load(&peak); }
