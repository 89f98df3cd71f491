/*
 * hostpool.c: a caching pool for the large CPU tensors the kernels return (leantune).
 *
 * Why: a training step allocates and frees gigabytes of same-shaped activations. With glibc
 * they either come from the heap, where long-lived saved activations between freed
 * temporaries leave holes that keep the peak RSS ~30% above what is live, or from fresh
 * mmaps, whose page faults cost ~15-30% of the step. A pool that keeps freed blocks and
 * hands them back for the same size again has neither cost: the shapes of every step repeat.
 *
 * How: lt_pool_alloc returns a DLPack DLManagedTensor (1-D, dtype given) over a pooled
 * block; quant/hostpool.py wraps it in a capsule and torch.from_dlpack owns it. When
 * torch frees the storage it calls the deleter, which puts the block on the free list.
 * Sizes are rounded up to a class: whole pages up to 1 MiB, above that eighths of an octave
 * (at most 12.5% over the request), so the varying sequence lengths of real batches map
 * onto a bounded set of classes; a request takes the smallest free block of its class or up
 * to a quarter larger (best fit).
 * Bound: the pool never maps more than the most bytes that were ever live at once (what a
 * step needs). On a miss, the least recently freed blocks are unmapped until the new block
 * fits under that high-water mark, so batches whose shapes vary from step to step (packing,
 * the last batch, eval) cannot grow it without end. Free blocks beyond `limit` bytes are
 * unmapped when freed too; lt_pool_release unmaps every free block.
 * All entry points are thread-safe (one mutex).
 *
 * DLPack structs below follow dlpack.h v0.8 (the unversioned "dltensor" capsule ABI).
 */
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#define LT_API __attribute__((visibility("default")))

typedef struct { int32_t device_type, device_id; } DLDevice; /* kDLCPU = 1 */
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct Block {
    struct Block *next; /* free list link */
    size_t size;        /* mapped bytes */
    void *data;
    int64_t shape[1];
    DLManagedTensor mt;
} Block;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Block *free_list; /* most recently freed first */
static size_t cached_bytes, live_bytes, peak_bytes, peak_live_bytes, limit_bytes = (size_t)1 << 40;
static int64_t n_hits, n_misses;

static void unmap_block(Block *b) {
    munmap(b->data, b->size);
    free(b);
}

static void pool_deleter(DLManagedTensor *mt) {
    Block *b = (Block *)mt->manager_ctx;
    pthread_mutex_lock(&lock);
    live_bytes -= b->size;
    if (cached_bytes + b->size <= limit_bytes) {
        b->next = free_list;
        free_list = b;
        cached_bytes += b->size;
        b = NULL;
    }
    pthread_mutex_unlock(&lock);
    if (b) unmap_block(b);
}

/* Whole pages up to 1 MiB; above, the next multiple of 2^(floor(log2 n) - 3). */
static size_t size_class(size_t n) {
    const size_t page = 4096;
    n = (n + page - 1) / page * page;
    if (n <= ((size_t)1 << 20)) return n;
    size_t top = (size_t)1 << (63 - __builtin_clzll((unsigned long long)n));
    size_t step = top >> 3;
    return (n + step - 1) / step * step;
}

/* Unlink and return the least recently freed block (the list's tail), or NULL. Locked. */
static Block *pop_oldest(void) {
    Block **p = &free_list;
    if (!*p) return NULL;
    while ((*p)->next) p = &(*p)->next;
    Block *b = *p;
    *p = NULL;
    cached_bytes -= b->size;
    return b;
}

/* A DLManagedTensor of `numel` elements of (code, bits), or NULL when out of memory. */
LT_API DLManagedTensor *lt_pool_alloc(int64_t numel, int code, int bits) {
    if (numel <= 0 || bits <= 0 || bits % 8) return NULL;
    const size_t want = size_class((size_t)numel * (size_t)(bits / 8));
    Block *b = NULL, **best = NULL, *drop = NULL;
    pthread_mutex_lock(&lock);
    for (Block **p = &free_list; *p; p = &(*p)->next) { /* best fit within a quarter */
        size_t size = (*p)->size;
        if (size >= want && size <= want + want / 4 && (!best || size < (*best)->size)) {
            best = p;
            if (size == want) break;
        }
    }
    if (best) {
        b = *best;
        *best = b->next;
        cached_bytes -= b->size;
        n_hits++;
    } else {
        n_misses++;
        /* stay under the high-water mark of live bytes: unmap the oldest free blocks */
        size_t bound = live_bytes + want > peak_live_bytes ? live_bytes + want : peak_live_bytes;
        while (live_bytes + cached_bytes + want > bound && free_list) {
            Block *old = pop_oldest();
            old->next = drop;
            drop = old;
        }
    }
    pthread_mutex_unlock(&lock);
    while (drop) {
        Block *next = drop->next;
        unmap_block(drop);
        drop = next;
    }
    if (!b) {
        void *data = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (data == MAP_FAILED) return NULL;
        b = (Block *)calloc(1, sizeof(Block));
        if (!b) {
            munmap(data, want);
            return NULL;
        }
        b->size = want;
        b->data = data;
    }
    b->next = NULL;
    b->shape[0] = numel;
    DLManagedTensor *mt = &b->mt;
    mt->dl_tensor.data = b->data;
    mt->dl_tensor.device.device_type = 1;
    mt->dl_tensor.device.device_id = 0;
    mt->dl_tensor.ndim = 1;
    mt->dl_tensor.dtype.code = (uint8_t)code;
    mt->dl_tensor.dtype.bits = (uint8_t)bits;
    mt->dl_tensor.dtype.lanes = 1;
    mt->dl_tensor.shape = b->shape;
    mt->dl_tensor.strides = NULL; /* compact row-major */
    mt->dl_tensor.byte_offset = 0;
    mt->manager_ctx = b;
    mt->deleter = pool_deleter;
    pthread_mutex_lock(&lock);
    live_bytes += b->size;
    if (live_bytes > peak_live_bytes) peak_live_bytes = live_bytes;
    if (live_bytes + cached_bytes > peak_bytes) peak_bytes = live_bytes + cached_bytes;
    pthread_mutex_unlock(&lock);
    return mt;
}

/* Unmap every free block; returns the bytes given back. */
LT_API int64_t lt_pool_release(void) {
    pthread_mutex_lock(&lock);
    Block *b = free_list;
    size_t freed = cached_bytes;
    free_list = NULL;
    cached_bytes = 0;
    pthread_mutex_unlock(&lock);
    while (b) {
        Block *next = b->next;
        unmap_block(b);
        b = next;
    }
    return (int64_t)freed;
}

/* Free blocks above `bytes` are unmapped instead of kept (now and on later frees). */
LT_API void lt_pool_set_limit(int64_t bytes) {
    pthread_mutex_lock(&lock);
    limit_bytes = bytes < 0 ? 0 : (size_t)bytes;
    Block *drop = NULL;
    while (cached_bytes > limit_bytes && free_list) {
        Block *b = free_list;
        free_list = b->next;
        cached_bytes -= b->size;
        b->next = drop;
        drop = b;
    }
    pthread_mutex_unlock(&lock);
    while (drop) {
        Block *next = drop->next;
        unmap_block(drop);
        drop = next;
    }
}

/* out[0..6] = live, cached, peak (live + cached) bytes, hits, misses, limit, peak live bytes */
LT_API void lt_pool_stats(int64_t *out) {
    pthread_mutex_lock(&lock);
    out[0] = (int64_t)live_bytes;
    out[1] = (int64_t)cached_bytes;
    out[2] = (int64_t)peak_bytes;
    out[3] = n_hits;
    out[4] = n_misses;
    out[5] = (int64_t)limit_bytes;
    out[6] = (int64_t)peak_live_bytes;
    pthread_mutex_unlock(&lock);
}

LT_API int lt_isa_level(void) { return 0; }

LT_API int lt_has_openmp(void) { return 0; }
