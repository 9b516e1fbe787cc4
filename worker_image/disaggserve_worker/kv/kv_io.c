/* The receiving half of a KV pull on the event loop, in C (`kv/native.py` drives it).

Why C: with sender and receiver on their own cores (as pods are), a 1 MB pull's Python between
the reply's first byte and the scatter-read of its layers (read the HEADER frame, check it,
build every layer's target regions in the reserved pool blocks, then the read) delayed the
receiver's copy by ~0.1-0.15 ms on a vCPU woken cold, while the sender kept filling the socket:
most of what a pull cost over raw loopback TCP (bench/kv_transfer.py --pin: 0.63x at 1 MB).
Here the same steps are a few microseconds.

The function never blocks: every read is MSG_DONTWAIT, and when nothing has arrived it returns
KV_AGAIN with its progress in the state, for the caller to wait for readability on its event
loop (with its timeout and cancellation) and call again. It writes only into the regions the
caller described (the reserved slots of the receiving pool) and only during a call, so once
the caller stops calling nothing writes into the pool any more.

The frames are those of `kv/framing.py`, protocol version 3: HEADER, then per layer
`LAYER | length | layer index | K | V`, then END. Anything it does not take (an ERROR frame,
a header with slot runs, a shape that does not fit) it leaves to the caller's Python path,
which reads and reports it as it would have: the bytes consumed so far are in `frames`. */

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>

#define KV_DONE 0
#define KV_AGAIN 1          /* nothing more has arrived: wait until readable, then call again */
#define KV_DECLINED_HEAD 2  /* the first frame is not a plain HEADER: its 9-byte head is read */
#define KV_DECLINED_HEADER 3 /* a HEADER this code does not take: head and payload are read */
#define KV_BAD_FRAMES 4     /* the layers and END are read, and a frame head is wrong */
#define KV_CLOSED (-1)      /* the peer closed the stream */
#define KV_ERRNO (-2)       /* a read failed: errno in `error` */
#define KV_BAD_STATE (-3)   /* the caller's description does not hold the reply (a bug) */

#define FRAME_HEAD 9        /* type (u8) | length (u64, big-endian) */
#define REPLY_SIZE 21       /* dtype u8, layers, tokens, kv heads, head size, slot runs (u32 each) */
#define LAYER_HEAD 13       /* frame head + layer index (u32) */
#define END_SIZE 17         /* frame head + byte count (u64) */
#define T_HEADER 2
#define T_LAYER 3
#define T_END 4
#define IOV_BATCH 1024      /* Linux's UIO_MAXIOV */

/* Every field 8 bytes wide, so the layout is the same on every 64-bit ABI (`native.PullState`
   mirrors it). */
typedef struct {
    /* set by the caller */
    int64_t fd;
    int64_t layers, dtype, kv_heads, head_dim;
    int64_t max_tokens;       /* the most tokens the reservation and the model take */
    int64_t token_bytes;      /* one token's K (or V) in one layer */
    int64_t pool_slots;       /* slots of the pool: a layer is (2, pool_slots, ...) */
    uint8_t *const *layer_base; /* each layer's memory */
    const int64_t *blocks;    /* the reservation's blocks, in order */
    int64_t nblocks, block_size;
    struct iovec *iov;        /* room for iov_cap entries */
    int64_t iov_cap;
    uint8_t *frames;          /* FRAME_HEAD + REPLY_SIZE + layers * LAYER_HEAD + END_SIZE bytes */
    int64_t spin_ns;          /* once the layers flow: how long to keep reading without progress */
    int64_t first_spin_ns;    /* the same for the reply's first bytes, on the first call only */
    /* progress */
    int64_t phase;            /* 0: frame head, 1: header payload, 2: layers and END, 3: done */
    int64_t got;              /* bytes of the current phase read */
    int64_t tokens;           /* from the header */
    int64_t iov_count, iov_at;
    int64_t error;            /* errno of a failed read */
} kv_pull_state;

static uint64_t be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Read into buf[s->got:want] without waiting, trying for up to `spin` ns when nothing has come
   (see kv_pull_step): KV_DONE when all of it is in. */
static int read_some(kv_pull_state *s, uint8_t *buf, int64_t want, int64_t spin) {
    int64_t idle_since = -1;
    while (s->got < want) {
        ssize_t n = recv((int)s->fd, buf + s->got, (size_t)(want - s->got), MSG_DONTWAIT);
        if (n > 0) { s->got += n; idle_since = -1; continue; }
        if (n == 0) return KV_CLOSED;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            s->error = errno;
            return KV_ERRNO;
        }
        int64_t now = now_ns();
        if (idle_since < 0) idle_since = now;
        if (now - idle_since >= spin) return KV_AGAIN;
        sched_yield();
    }
    return KV_DONE;
}

/* The scatter list of the reply after the header: each layer's frame head, its K then V regions
   of the first `tokens` reserved slots (consecutive blocks merged into one region), then END. */
static int build_iov(kv_pull_state *s) {
    uint8_t *heads = s->frames + FRAME_HEAD + REPLY_SIZE;
    int64_t count = 0, tb = s->token_bytes;
    for (int64_t layer = 0; layer < s->layers; layer++) {
        if (count >= s->iov_cap) return KV_BAD_STATE;
        s->iov[count].iov_base = heads + layer * LAYER_HEAD;
        s->iov[count++].iov_len = LAYER_HEAD;
        for (int64_t kv = 0; kv < 2; kv++) {
            uint8_t *base = s->layer_base[layer] + kv * s->pool_slots * tb;
            int64_t left = s->tokens, run_start = -1, run_len = 0;
            for (int64_t b = 0; b < s->nblocks && left > 0; b++) {
                int64_t n = left < s->block_size ? left : s->block_size;
                int64_t start = s->blocks[b] * s->block_size;
                if (start < 0 || start + n > s->pool_slots) return KV_BAD_STATE;
                left -= n;
                if (run_start >= 0 && run_start + run_len == start) { run_len += n; continue; }
                if (run_start >= 0) {
                    if (count >= s->iov_cap) return KV_BAD_STATE;
                    s->iov[count].iov_base = base + run_start * tb;
                    s->iov[count++].iov_len = (size_t)(run_len * tb);
                }
                run_start = start;
                run_len = n;
            }
            if (left > 0) return KV_BAD_STATE;  /* more tokens than the reservation holds */
            if (count >= s->iov_cap) return KV_BAD_STATE;
            s->iov[count].iov_base = base + run_start * tb;
            s->iov[count++].iov_len = (size_t)(run_len * tb);
        }
    }
    if (count >= s->iov_cap) return KV_BAD_STATE;
    s->iov[count].iov_base = heads + s->layers * LAYER_HEAD;
    s->iov[count++].iov_len = END_SIZE;
    s->iov_count = count;
    s->iov_at = 0;
    return KV_DONE;
}

/* Whether the HEADER fits what the caller expects; the caller's Python re-checks one that does
   not, and reports it (or, if it disagrees, reads on). */
static int header_fits(kv_pull_state *s) {
    const uint8_t *p = s->frames + FRAME_HEAD;
    int64_t tokens = be32(p + 5);
    if (p[0] != s->dtype || be32(p + 1) != (uint64_t)s->layers || be32(p + 9) != (uint64_t)s->kv_heads
            || be32(p + 13) != (uint64_t)s->head_dim || be32(p + 17) != 0)
        return 0;
    if (tokens <= 0 || tokens > s->max_tokens) return 0;
    s->tokens = tokens;
    return 1;
}

static int frames_ok(kv_pull_state *s) {
    const uint8_t *heads = s->frames + FRAME_HEAD + REPLY_SIZE;
    uint64_t layer_len = 4 + (uint64_t)(2 * s->tokens * s->token_bytes);
    for (int64_t layer = 0; layer < s->layers; layer++) {
        const uint8_t *h = heads + layer * LAYER_HEAD;
        if (h[0] != T_LAYER || be64(h + 1) != layer_len || be32(h + FRAME_HEAD) != (uint64_t)layer) return 0;
    }
    const uint8_t *end = heads + s->layers * LAYER_HEAD;
    return end[0] == T_END && be64(end + 1) == 8;
}

/* Move the pull on as far as what has arrived allows (see the status codes above). The first
   call may wait for the reply's first bytes up to first_spin_ns (native.FIRST_SPIN_NS says why),
   later ones only while the layers flow (spin_ns). */
int kv_pull_step(kv_pull_state *s) {
    int status;
    int64_t first = s->first_spin_ns;
    s->first_spin_ns = 0;  /* once: a later call was woken by the loop, its wait is over */
    if (s->phase == 0) {
        if ((status = read_some(s, s->frames, FRAME_HEAD, first)) != KV_DONE) return status;
        if (s->frames[0] != T_HEADER || be64(s->frames + 1) != REPLY_SIZE) return KV_DECLINED_HEAD;
        s->phase = 1;
        s->got = 0;
    }
    if (s->phase == 1) {
        if ((status = read_some(s, s->frames + FRAME_HEAD, REPLY_SIZE, s->spin_ns)) != KV_DONE) return status;
        if (!header_fits(s)) return KV_DECLINED_HEADER;
        if ((status = build_iov(s)) != KV_DONE) return status;
        s->phase = 2;
    }
    int64_t idle_since = -1;  /* when the last read found nothing (spinning), -1: it found bytes */
    while (s->phase == 2) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        int64_t left = s->iov_count - s->iov_at;
        msg.msg_iov = s->iov + s->iov_at;
        msg.msg_iovlen = (size_t)(left < IOV_BATCH ? left : IOV_BATCH);
        ssize_t n = recvmsg((int)s->fd, &msg, MSG_DONTWAIT);
        if (n == 0) return KV_CLOSED;
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                s->error = errno;
                return KV_ERRNO;
            }
            /* The sender is mid-reply: its next segment is microseconds away. Sleeping until the
               loop sees it readable cost ~0.15 ms a time on the bench host's vCPUs (a halted vCPU's
               wake-up), several times per 1 MB pull once this read kept pace with the sender. So
               keep reading for up to spin_ns without progress, yielding the core each time (a
               sender sharing it runs), before handing the wait to the event loop. */
            int64_t now = now_ns();
            if (idle_since < 0) idle_since = now;
            if (now - idle_since >= s->spin_ns) return KV_AGAIN;
            sched_yield();
            continue;
        }
        idle_since = -1;
        while (n > 0) {  /* drop what was filled from the front of the list */
            struct iovec *v = s->iov + s->iov_at;
            if ((size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                s->iov_at++;
            } else {
                v->iov_base = (uint8_t *)v->iov_base + n;
                v->iov_len -= (size_t)n;
                n = 0;
            }
        }
        if (s->iov_at == s->iov_count) s->phase = 3;
    }
    return frames_ok(s) ? KV_DONE : KV_BAD_FRAMES;
}

/* Re-arm `s` for the next pull on its connection and take the first step: the state, its
   frame and scatter buffers are made once per connection (`native.NativePull`), and a pull sets
   only its reservation (blocks, block size, the most tokens it takes) and its first spin here.
   Why: made afresh for each pull in Python they took ~5 us warm, but between the REQUEST and
   the first read, on a vCPU woken cold, that Python took ~70 us of a ~1 ms 1 MB pull
   (bench/kv_transfer.py, unpinned), while the port's thread, woken onto the same vCPU, waited.
   `iov_cap` must hold layers * (1 + 2 * nblocks) + 1 entries (build_iov checks it). */
int kv_pull_begin(kv_pull_state *s, const int64_t *blocks, int64_t nblocks, int64_t block_size,
                  int64_t max_tokens, int64_t first_spin_ns) {
    s->blocks = blocks;
    s->nblocks = nblocks;
    s->block_size = block_size;
    s->max_tokens = max_tokens;
    s->first_spin_ns = first_spin_ns;
    s->phase = s->got = s->tokens = s->iov_count = s->iov_at = s->error = 0;
    return kv_pull_step(s);
}

/* ---- the port's side ------------------------------------------------------------------------

   One whole control frame (a REQUEST, an ACK) from a blocking socket, its head in buf[0:9] and
   its payload after: the payload's length, or
     KV_CLOSED   the peer closed the stream (before or inside the frame),
     KV_ERRNO    a read failed, errno in *error (EAGAIN: the socket's SO_RCVTIMEO ran out),
     KV_TOO_LONG the head (read) announces a LAYER frame or more than `limit` bytes: not read on.
   Why: on a port thread woken cold, Python's two reads and the frame checks between them took
   50-90 us of a ~0.9 ms 1 MB pull before its reply could start (bench/kv_transfer.py --pin).
   Called through ctypes, which lets go of the GIL while this waits for the next frame. */
#define KV_TOO_LONG (-4)

static int64_t read_all(int fd, uint8_t *buf, int64_t want, int64_t *error) {
    int64_t got = 0;
    while (got < want) {
        ssize_t n = recv(fd, buf + got, (size_t)(want - got), MSG_WAITALL);
        if (n > 0) { got += n; continue; }
        if (n == 0) return KV_CLOSED;
        if (errno == EINTR) continue;
        *error = errno;
        return KV_ERRNO;
    }
    return 0;
}

int64_t kv_recv_frame(int64_t fd, uint8_t *buf, int64_t limit, int64_t *error) {
    int64_t status = read_all((int)fd, buf, FRAME_HEAD, error);
    if (status != 0) return status;
    uint64_t length = be64(buf + 1);
    if (buf[0] == T_LAYER || length > (uint64_t)limit) return KV_TOO_LONG;
    status = read_all((int)fd, buf + FRAME_HEAD, (int64_t)length, error);
    return status != 0 ? status : (int64_t)length;
}

/* A reply prepared as a gather list (`KVServer._prepare`: the header, each layer's frame head and
   its K and V regions in the pool, the END), sent on a blocking socket in sendmsg calls of at most
   `cap` bytes (the socket buffer: one call of a whole 12 MB reply ran at 0.7x raw TCP's pace, see
   framing.send_buffers). `iov` is left as it is (a failed pull's retry sends it again). 0, or
   KV_ERRNO with errno in *error (EAGAIN: SO_SNDTIMEO ran out; EPIPE/ECONNRESET: the peer left).
   Why: on a port thread woken cold, Python's walk over the list before the first sendmsg was a
   noticeable share of a 1 MB pull's time to first byte (bench/kv_transfer.py --pin). */
int64_t kv_send_iov(int64_t fd, const struct iovec *iov, int64_t count, int64_t cap, int64_t *error) {
    struct iovec batch[IOV_BATCH];
    int64_t at = 0;          /* the first entry not wholly sent */
    size_t offset = 0;       /* bytes of it already sent */
    for (;;) {
        while (at < count && iov[at].iov_len == offset) {  /* step past what is wholly sent (or empty) */
            at++;
            offset = 0;
        }
        if (at == count) return 0;
        int64_t n = 0, size = 0;
        for (int64_t i = at; i < count && n < IOV_BATCH && size < cap; i++, n++) {
            size_t skip = i == at ? offset : 0;
            batch[n].iov_base = (uint8_t *)iov[i].iov_base + skip;
            batch[n].iov_len = iov[i].iov_len - skip;
            if (size + (int64_t)batch[n].iov_len > cap) batch[n].iov_len = (size_t)(cap - size);
            size += (int64_t)batch[n].iov_len;
        }
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = batch;
        msg.msg_iovlen = (size_t)n;
        ssize_t sent = sendmsg((int)fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            *error = errno;
            return KV_ERRNO;
        }
        while (sent > 0) {  /* step past what went out */
            size_t left = iov[at].iov_len - offset;
            if ((size_t)sent >= left) {
                sent -= (ssize_t)left;
                at++;
                offset = 0;
            } else {
                offset += (size_t)sent;
                sent = 0;
            }
        }
    }
}

/* ---- the port's whole REQUEST -> reply -> ACK step ----------------------------------------

   Why: after the frame read and the send went to C, what still delayed a reply's first byte on
   the port was the Python between them (the REQUEST's decode, `Engine.pin_held`, the ACK's
   timeout switch): steps of 1-5 us warm that took 10-70 us on a port thread woken cold, on the
   2-vCPU host often on the very vCPU the receiver waits on (bench/kv_transfer.py, unpinned).
   Here a REQUEST for a held cache whose reply was prepared (`KVServer._prepare`, registered in
   the port's table by handle) is answered without Python: read the frame, find and take the
   entry, send its gather list, then wait for the ACK under the frame timeout and go back to the
   idle timeout. Python comes in once the ACK (or a failure) is in, to release the cache.

   Anything unusual is left to Python with the frame as read (KV_FALLBACK): another frame
   kind, flags (shm, copied), a handle not in the table (unknown, expired, or being sent by
   another connection), a request id that is not plain ASCII (Python's UTF-8 check then
   decides), a malformed payload.

   The table: entries are Python-owned (`native.HeldEntry`, kept alive by the held cache) and
   chained by handle under the table's mutex. `state` says who may send an entry: IDLE (this
   path may take it), BUSY (taken: a send is in flight, the engine must not free the blocks;
   it counts as a pin), GONE (out of the table: this path no longer takes it). The engine
   moves an entry to GONE before it frees a cache (`kv_table_revoke`, which refuses while
   BUSY), and the port ends a take with `kv_table_finish`. */

#define KV_FALLBACK 1       /* the frame is left to Python (head and payload in buf) */
#define KV_SENT 2           /* the reply went out and the next frame (the ACK, in ack_buf) is in */
#define KV_SEND_FAILED 3    /* taken, and the send failed: errno in error */
#define KV_ACK_FAILED 4     /* taken, sent, and the next frame's read failed: ack_status */
#define T_REQUEST 1
#define STATE_IDLE 0
#define STATE_BUSY 1
#define STATE_GONE 2
#define TABLE_BUCKETS 1024

typedef struct kv_entry {
    const uint8_t *key;       /* the handle, UTF-8 */
    int64_t key_len;
    const struct iovec *iov;  /* the prepared reply (`native.Gather`) */
    int64_t iov_count;
    int64_t expires_ns;       /* CLOCK_MONOTONIC (Python's time.monotonic) */
    int64_t state;            /* under the table's mutex */
    struct kv_entry *next;    /* its bucket's chain */
    int64_t linked;           /* whether it is in the table */
} kv_entry;

typedef struct {
    pthread_mutex_t lock;
    int64_t refs;             /* the port's, and one per entry added: freed when the last goes */
    kv_entry *buckets[TABLE_BUCKETS];
} kv_table;

static uint64_t hash_key(const uint8_t *key, int64_t len) {
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
    for (int64_t i = 0; i < len; i++) h = (h ^ key[i]) * 1099511628211ULL;
    return h;
}

/* A table with one reference (the port's). Why counted: Python frees a port and its held
   caches' entries in no set order (a cycle collected at once), and an entry leaving must still
   find the table to unlink itself. */
void *kv_table_new(void) {
    kv_table *t = calloc(1, sizeof *t);
    if (t != NULL && pthread_mutex_init(&t->lock, NULL) != 0) {
        free(t);
        return NULL;
    }
    if (t != NULL) t->refs = 1;
    return t;
}

/* Drop one reference (the port's, or an entry's after it left the table). */
void kv_table_release(kv_table *t) {
    if (t == NULL || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    pthread_mutex_destroy(&t->lock);
    free(t);
}

static void unlink_entry(kv_table *t, kv_entry *e) {
    if (!e->linked) return;
    kv_entry **at = &t->buckets[hash_key(e->key, e->key_len) % TABLE_BUCKETS];
    while (*at != NULL && *at != e) at = &(*at)->next;
    if (*at == e) *at = e->next;
    e->next = NULL;
    e->linked = 0;
}

/* Register `e` (state IDLE): from here a REQUEST for its handle may take it. The entry holds a
   reference to the table from here (kv_table_release once it has left: revoked). */
void kv_table_add(kv_table *t, kv_entry *e) {
    __atomic_add_fetch(&t->refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_lock(&t->lock);
    kv_entry **bucket = &t->buckets[hash_key(e->key, e->key_len) % TABLE_BUCKETS];
    e->state = STATE_IDLE;
    e->next = *bucket;
    e->linked = 1;
    *bucket = e;
    pthread_mutex_unlock(&t->lock);
}

/* No more takes of `e`: 1, or 0 while one is in flight (BUSY: the cache counts as pinned). */
int64_t kv_table_revoke(kv_table *t, kv_entry *e) {
    pthread_mutex_lock(&t->lock);
    int64_t done = e->state != STATE_BUSY;
    if (done) {
        unlink_entry(t, e);
        e->state = STATE_GONE;
    }
    pthread_mutex_unlock(&t->lock);
    return done;
}

/* End a take: IDLE again if `keep`, else GONE (delivered, failed, or expired meanwhile). */
void kv_table_finish(kv_table *t, kv_entry *e, int64_t keep) {
    pthread_mutex_lock(&t->lock);
    if (e->state == STATE_BUSY) {
        if (keep) {
            e->state = STATE_IDLE;
        } else {
            unlink_entry(t, e);
            e->state = STATE_GONE;
        }
    }
    pthread_mutex_unlock(&t->lock);
}

/* The entry for `key` if this path may take it now (IDLE, not expired): taken (BUSY). */
static kv_entry *take(kv_table *t, const uint8_t *key, int64_t len) {
    int64_t now = now_ns();
    pthread_mutex_lock(&t->lock);
    kv_entry *e = t->buckets[hash_key(key, len) % TABLE_BUCKETS];
    while (e != NULL && !(e->key_len == len && memcmp(e->key, key, (size_t)len) == 0)) e = e->next;
    if (e != NULL && (e->state != STATE_IDLE || e->expires_ns < now)) e = NULL;
    if (e != NULL) e->state = STATE_BUSY;
    pthread_mutex_unlock(&t->lock);
    return e;
}

/* One connection's arguments, made once (`native.PortStep`); the outcome fields are written. */
typedef struct {
    int64_t fd;
    kv_table *table;
    uint8_t *buf;             /* FRAME_HEAD + limit: the REQUEST (or whatever frame came) */
    uint8_t *ack_buf;         /* FRAME_HEAD + limit: the frame after the reply */
    int64_t limit;            /* the most payload a control frame may announce */
    int64_t cap;              /* the most bytes per sendmsg (kv_send_iov) */
    int64_t frame_sec, frame_usec;  /* SO_RCVTIMEO while the ACK is due */
    int64_t idle_sec, idle_usec;    /* SO_RCVTIMEO while the next REQUEST is */
    /* outcome */
    int64_t length;           /* the REQUEST's (or fallback frame's) payload length */
    int64_t ack_length;       /* the next frame's payload length (KV_SENT) */
    int64_t ack_status;       /* kv_recv_frame's failure on that frame (KV_ACK_FAILED) */
    int64_t error;            /* errno */
    kv_entry *entry;          /* the entry taken (KV_SENT, KV_SEND_FAILED, KV_ACK_FAILED), else NULL */
    int64_t elapsed_ns;       /* from the take to the ACK's arrival */
} kv_port_step;

static int set_rcvtimeo(int fd, int64_t sec, int64_t usec) {
    struct timeval tv = {.tv_sec = (time_t)sec, .tv_usec = (suseconds_t)usec};
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Serve one REQUEST on the connection's blocking socket (its SO_RCVTIMEO the idle timeout):
   KV_SENT, KV_FALLBACK, KV_SEND_FAILED, KV_ACK_FAILED, or the frame read's own failures on the
   REQUEST (KV_CLOSED, KV_ERRNO, KV_TOO_LONG: nothing taken). Called through ctypes, which lets
   go of the GIL for the whole step, waits included. */
int64_t kv_port_step_run(kv_port_step *a) {
    int fd = (int)a->fd;
    a->entry = NULL;
    a->length = a->ack_length = a->ack_status = a->error = a->elapsed_ns = 0;
    int64_t got = kv_recv_frame(a->fd, a->buf, a->limit, &a->error);
    if (got < 0) return got;
    a->length = got;
    const uint8_t *p = a->buf + FRAME_HEAD;
    if (a->buf[0] != T_REQUEST || got < 3 || p[0] != 0) return KV_FALLBACK;  /* flags: shm, copied */
    int64_t key_len = ((int64_t)p[1] << 8) | p[2];
    if (3 + key_len > got) return KV_FALLBACK;
    for (int64_t i = 3 + key_len; i < got; i++)
        if (p[i] >= 0x80) return KV_FALLBACK;  /* the request id: Python's UTF-8 check decides */
    kv_entry *e = take(a->table, p + 3, key_len);
    if (e == NULL) return KV_FALLBACK;
    a->entry = e;
    int64_t start = now_ns();
    if (kv_send_iov(a->fd, e->iov, e->iov_count, a->cap, &a->error) != 0) return KV_SEND_FAILED;
    /* The reply is out: the ACK is due within a frame's time, then the idle bound again. */
    if (set_rcvtimeo(fd, a->frame_sec, a->frame_usec) != 0) {
        a->ack_status = KV_ERRNO;
        a->error = errno;
        return KV_ACK_FAILED;
    }
    int64_t ack = kv_recv_frame(a->fd, a->ack_buf, a->limit, &a->error);
    a->elapsed_ns = now_ns() - start;
    int restored = set_rcvtimeo(fd, a->idle_sec, a->idle_usec);
    if (ack < 0) {
        a->ack_status = ack;
        return KV_ACK_FAILED;
    }
    if (restored != 0) {
        a->ack_status = KV_ERRNO;
        a->error = errno;
        return KV_ACK_FAILED;
    }
    a->ack_length = ack;
    return KV_SENT;
}
