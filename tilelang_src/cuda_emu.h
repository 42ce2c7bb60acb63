// CPU stand-ins for the CUDA constructs TileLang's generated kernels use, so that the generated
// source itself can be compiled with a host C++ compiler and run on the CPU (emulate.py).
//
// Execution model: each CUDA thread of a CTA is a user-space fiber on one OS thread; CTAs
// of the grid run one after another. A fiber runs until it reaches __syncthreads() or returns; once
// every thread of the CTA has arrived the next phase starts. Threads run in ascending order in even
// CTAs and descending order in odd CTAs, so a shared-memory read that lacks its barrier sees the
// writer's value in one order and a stale one in the other. Each CTA starts with its shared memory
// filled with 0xff bytes (a NaN in every float type), so a read of shared memory nobody wrote shows.
// A CTA whose threads disagree on the number of barriers they reach (some return while others wait)
// is an error, reported to the caller. Fibers make a barrier a context switch instead of a futex
// wake-up of every OS thread, and the run deterministic.
// Half-precision types keep their bit layout (so torch's CPU tensors can be passed by pointer) and
// convert with round-to-nearest-even, as the CUDA intrinsics do.
// Only what the mHC kernels need is here; an unknown construct fails to compile, loudly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sys/mman.h>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

typedef unsigned char uchar;

struct emu_dim3 { int x = 0, y = 0, z = 0; };
namespace emu {
extern emu_dim3 thread_idx, block_idx;
extern unsigned char *smem;
void sync_cta();
void exchange(const void *value, void *partner_value, int bytes, int partner);
}  // namespace emu
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
inline void __syncthreads() { emu::sync_cta(); }

// -- vector types: natural (4-byte) alignment, so a cast from a 2-byte aligned local array is legal on x86
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// -- bfloat16 / half with CUDA's bit layout and round-to-nearest-even conversions
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = 0x7fc0; return; }  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct half_t {
  _Float16 v;
  half_t() = default;
  half_t(float f) : v(_Float16(f)) {}
  operator float() const { return float(v); }
};
static_assert(sizeof(bfloat16_t) == 2 && sizeof(half_t) == 2, "16-bit storage types");
struct __nv_bfloat162 { bfloat16_t x, y; };
struct half2 { half_t x, y; };
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {bfloat16_t(v.x), bfloat16_t(v.y)}; }
inline float2 __half22float2(half2 v) { return {float(v.x), float(v.y)}; }
inline half2 __float22half2_rn(float2 v) { return {half_t(v.x), half_t(v.y)}; }

// -- math
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// -- tl::AllReduce: the same butterfly (partner = tid ^ offset, offsets threads/2 .. scale) with the
// exchange done through a CTA-wide buffer; every thread of the CTA calls it, as in the generated code.
namespace tl {
struct SumOp { template <typename T> T operator()(T a, T b) const { return a + b; } };
struct MaxOp { template <typename T> T operator()(T a, T b) const { return a > b ? a : b; } };
template <int all_threads> struct NamedBarrier {};
template <class Reducer, int threads, int scale, int thread_offset, class Barrier, int batch = 1, int stride = 0>
struct AllReduce {
  template <typename T> static T run(T x, T *red_buf = nullptr) {
    static_assert(sizeof(T) <= 16, "the exchange buffer holds 16 bytes per thread");
    (void)red_buf;
    for (int offset = threads / 2; offset >= scale; offset /= 2) {
      int me = threadIdx.x - thread_offset;
      T other;
      emu::exchange(&x, &other, sizeof(T), thread_offset + (me ^ offset));
      x = Reducer()(x, other);
    }
    return x;
  }
};
}  // namespace tl

// -- the launcher (defined once, in the translation unit that includes this with EMU_IMPLEMENTATION)
#ifdef EMU_IMPLEMENTATION
namespace emu {
emu_dim3 thread_idx, block_idx;
unsigned char *smem;

enum FiberState { RUNNING, AT_BARRIER, RETURNED };

// The context switch. On x86-64 a few instructions that save the callee-saved registers and swap
// stack pointers (swapcontext would also make a sigprocmask system call per switch, and a kernel
// with a reduction tree switches about a million times per launch); elsewhere ucontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
extern "C" __attribute__((visibility("hidden"))) void emu_switch(void **save_sp, void *load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
struct Context {
  void *sp = nullptr;
};
static void switch_to(Context &save, Context &load) { emu_switch(&save.sp, load.sp); }
static void start_context(Context &c, unsigned char *stack, size_t bytes, void (*entry)()) {
  // the new stack as emu_switch leaves a suspended one: six saved registers, then the address `ret`
  // jumps to, then a slot standing for entry's own return address (rsp = 8 mod 16 on entry, as after
  // a call)
  void **top = reinterpret_cast<void **>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  top -= 2;
  top[0] = reinterpret_cast<void *>(entry);
  top[1] = nullptr;
  top -= 6;
  for (int i = 0; i < 6; ++i) top[i] = nullptr;
  c.sp = top;
}
#else
struct Context {
  ucontext_t uc;
};
static void switch_to(Context &save, Context &load) { swapcontext(&save.uc, &load.uc); }
static void start_context(Context &c, unsigned char *stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // fiber_entry never returns
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  emu_dim3 tid;
  FiberState state;
};
static Context scheduler;
static std::vector<Fiber> fibers;
static int current;
static const std::function<void()> *kernel_body;
static std::vector<unsigned char> xbuf;
static int xbytes = 16;

void sync_cta() {
  Fiber &f = fibers[current];
  f.state = AT_BARRIER;
  switch_to(f.ctx, scheduler);
}

void exchange(const void *value, void *partner_value, int bytes, int partner) {
  sync_cta();
  std::memcpy(&xbuf[size_t(threadIdx.x) * xbytes], value, bytes);
  sync_cta();
  std::memcpy(partner_value, &xbuf[size_t(partner) * xbytes], bytes);
}

[[noreturn]] static void fiber_entry() {
  (*kernel_body)();
  Fiber &f = fibers[current];
  f.state = RETURNED;
  switch_to(f.ctx, scheduler);  // never resumed
  __builtin_unreachable();
}

// 0 when every CTA ran to the end; 1 when a CTA's threads reached different numbers of barriers;
// 2 when the fiber stacks could not be mapped.
int launch(int gx, int gy, int gz, int bx, int by, int bz, long smem_bytes, const std::function<void()> &body) {
  const int nthreads = bx * by * bz;
  const size_t stack_bytes = size_t(256) << 10, page = 4096;
  // one mapping: per fiber a PROT_NONE guard page below its stack, so an overflow faults instead of
  // writing into the next fiber's stack; pages are committed only when touched
  const size_t slot = stack_bytes + page;
  unsigned char *stacks = static_cast<unsigned char *>(
      mmap(nullptr, slot * nthreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) return 2;
  for (int t = 0; t < nthreads; ++t) mprotect(stacks + slot * t, page, PROT_NONE);
  std::vector<unsigned char> shared(size_t(smem_bytes) + 16);
  smem = shared.data();
  xbuf.assign(size_t(nthreads) * xbytes, 0);
  fibers.assign(nthreads, Fiber{});
  kernel_body = &body;
  int status = 0;
  long cta = 0;
  for (int z = 0; z < gz && status == 0; ++z)
    for (int y = 0; y < gy && status == 0; ++y)
      for (int x = 0; x < gx && status == 0; ++x, ++cta) {
        block_idx = {x, y, z};
        std::memset(shared.data(), 0xff, shared.size());
        for (int t = 0; t < nthreads; ++t) {
          Fiber &f = fibers[t];
          f.tid = {t % bx, (t / bx) % by, t / (bx * by)};
          f.state = RUNNING;
          start_context(f.ctx, stacks + slot * t + page, stack_bytes, fiber_entry);
        }
        const bool descending = cta % 2 == 1;
        for (;;) {  // one barrier phase per pass
          int returned = 0;  // the others wait at the barrier
          for (int i = 0; i < nthreads; ++i) {
            current = descending ? nthreads - 1 - i : i;
            Fiber &f = fibers[current];
            thread_idx = f.tid;
            f.state = RUNNING;
            switch_to(scheduler, f.ctx);
            returned += f.state == RETURNED;
          }
          if (returned == nthreads) break;
          if (returned != 0) {  // some threads returned while others wait at a barrier
            status = 1;
            break;
          }
        }
      }
  munmap(stacks, slot * nthreads);
  return status;
}
}  // namespace emu
#endif
