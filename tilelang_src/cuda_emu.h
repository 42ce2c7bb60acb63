// CPU stand-ins for the CUDA constructs TileLang's generated kernels use, so that the generated
// source itself can be compiled with a host C++ compiler and run on CPU threads (emulate.py).
//
// Execution model: one OS thread per CUDA thread of a CTA; CTAs of the grid run one after another;
// __syncthreads() is a barrier over the CTA's threads; shared memory is one buffer per launch,
// reused by each CTA. Half-precision types keep their bit layout (so torch's CPU tensors can be
// passed by pointer) and convert with round-to-nearest-even, as the CUDA intrinsics do.
// Only what the mHC kernels need is here; an unknown construct fails to compile, loudly.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
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
extern thread_local emu_dim3 thread_idx, block_idx;
extern thread_local unsigned char *smem;
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
thread_local emu_dim3 thread_idx, block_idx;
thread_local unsigned char *smem;
static std::barrier<> *cta_barrier;
static std::vector<unsigned char> xbuf;
static int xbytes = 16;

void sync_cta() { cta_barrier->arrive_and_wait(); }

void exchange(const void *value, void *partner_value, int bytes, int partner) {
  cta_barrier->arrive_and_wait();
  std::memcpy(&xbuf[size_t(threadIdx.x) * xbytes], value, bytes);
  cta_barrier->arrive_and_wait();
  std::memcpy(partner_value, &xbuf[size_t(partner) * xbytes], bytes);
}

void launch(int gx, int gy, int gz, int bx, int by, int bz, long smem_bytes, const std::function<void()> &body) {
  int nthreads = bx * by * bz;
  std::barrier<> bar(nthreads);
  cta_barrier = &bar;
  std::vector<unsigned char> shared(size_t(smem_bytes) + 16);
  xbuf.assign(size_t(nthreads) * xbytes, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < nthreads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = {t % bx, (t / bx) % by, t / (bx * by)};
      smem = shared.data();
      for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
          for (int x = 0; x < gx; ++x) {
            block_idx = {x, y, z};
            body();
            bar.arrive_and_wait();  // the next CTA reuses the shared buffer
          }
    });
  }
  for (auto &th : pool) th.join();
}
}  // namespace emu
#endif
