// PSFT forward and backward in one pass on Hopper (sm_90): each row of logits is read from HBM
// once, held on chip by a thread-block cluster, and the gradient is written from there.
//
// A cluster of C CTAs (C in {1, 2, 4, 8}) owns one row at a time; CTA `rank` holds a contiguous
// slice of it in its dynamic shared memory, in the logits' dtype. Per row:
//   1. each CTA copies its slice global -> registers -> shared memory with 16-byte loads,
//      accumulating the base-2 online softmax (psft_softmax.cuh) on the way;
//   2. a deterministic block reduction gives the CTA's partial SoftmaxStats, published in its
//      shared memory; cluster.sync();
//   3. every CTA reads the C partials through distributed shared memory and merges them in rank
//      order 0..C-1, so all CTAs hold bitwise the same lse and entropy, and runs the forward's
//      epilogue (psft::token_loss); rank 0 writes the row's 8 outputs;
//   4. each CTA writes the gradient of its slice from shared memory:
//      g_j = grad_loss[r] * coef / tau * (exp(z_j / tau - lse) - [j == y]), grad_loss being the
//      upstream gradient the caller expects for the row's loss.
// Clusters loop over rows with a grid stride (a persistent grid of as many clusters as fit).
//
// Shared-memory layout of a CTA: the row is cut on the *input's* 16-byte grid. With pa the
// row's offset (in elements) from a 16-byte boundary, element j sits at u = j + pa; CTA `rank`
// holds u in [rank * chunk, (rank + 1) * chunk) (chunk a whole number of 16-byte vectors), at
// shared index u - rank * chunk. Global and shared memory then have the same 16-byte phase, so
// the copy is 16-byte vectors on both sides, with scalar head / tail at the row's two ends only.
// The gradient (dense, row stride V) is written on the *output's* 16-byte grid: where the output
// row's phase differs from the input's (strided or offset views), each 16-byte output vector is
// assembled from two aligned shared-memory vectors with a funnel shift.
//
// Synchronisation: the partials are double-buffered by the parity of the rows that synchronise,
// so a CTA rewrites a buffer only after the next cluster.sync, which every peer reaches only
// once done reading it; a __syncthreads before each row's copy keeps the slice and the row
// constants from being overwritten while this CTA's threads still read them; a final
// cluster.sync keeps every CTA's shared memory alive until its peers are done with it. The
// branches around cluster.sync depend only on the row's target, which every CTA of the cluster
// reads alike, so all CTAs of a cluster take the same ones.
//
// In place: the gradient may be written over the logits themselves (contiguous rows, row_stride
// == V). A CTA writes only the elements of its own slice, after the barriers that follow its
// copy, and z_y (read by every CTA) is parked in shared memory before the cluster barrier, so
// every element is read before anything overwrites it; no row is read by two clusters.
#include <cooperative_groups.h>

#include <map>
#include <mutex>
#include <tuple>

#include "psft_common.cuh"
#include "psft_launch.h"
#include "psft_softmax.cuh"

namespace psft {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

// 512 threads, 2 CTAs per SM (64 registers): 1024 resident threads per SM as in the other kernels.
constexpr int kFusedThreads = 512;
constexpr int kFusedCtasPerSm = 2;
// The portable cluster size limit (a larger one would need
// cudaFuncAttributeNonPortableClusterSizeAllowed).
constexpr int kMaxClusterSize = 8;
// Dynamic shared memory per CTA (the slice plus one 16-byte pad vector). H100 / H200 have 228 KB
// of shared memory per SM, 1 KB of it reserved per resident CTA: two CTAs of 110 KB plus the
// 240 bytes of static shared memory fit.
constexpr int64_t kSmemPerCta = 110 * 1024;
// Room left for the static shared memory when checking the per-block opt-in limit.
constexpr int64_t kStaticSmemAllowance = 1024;

struct FusedArgs {
  Rows in;
  const float* old_logprobs;
  const float* advantages;
  LossParams params;
  const float* grad_loss;  // (N,): the upstream gradient expected for each row's loss
  ForwardOutputs out;
  void* grad;
  int64_t chunk_vectors;  // 16-byte vectors of the (input-aligned) row per CTA
};

// Device helpers, compiled for sm_90+ only (and seen by the host pass): in the sm_80 pass the
// kernel is a stub and they would be unreferenced.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// 16-byte vectors each thread loads before it consumes any.
constexpr int kFusedUnroll = 4;

// The part of a row one CTA holds: elements [lo, lo + count) of the row, element lo at shared
// index `first` (pa for rank 0, 0 for the others). count is 0 for a CTA past the row's end.
// Everything but lo fits an int: a slice is at most kSmemPerCta bytes.
struct Slice {
  int64_t lo;
  int count;
  int first;
};

template <typename T>
__device__ __forceinline__ Slice cta_slice(const T* in_row, int64_t vocab, int64_t chunk_elems,
                                           unsigned int rank) {
  const int pa = static_cast<int>((reinterpret_cast<uintptr_t>(in_row) & 15u) / sizeof(T));
  const int64_t base = static_cast<int64_t>(rank) * chunk_elems;  // in u = j + pa
  const int64_t first = base < pa ? pa - base : 0;                // pa for rank 0, else 0
  Slice s;
  s.lo = base + first - pa;
  int64_t hi = base + chunk_elems - pa;
  hi = hi < vocab ? hi : vocab;
  s.count = hi > s.lo ? static_cast<int>(hi - s.lo) : 0;
  s.first = static_cast<int>(first);
  return s;
}

// Loads of the logits. Streaming (ld.global.cs: coherent, evict-first; each element is read once
// and then lives in shared memory), not the read-only path (__ldg): the gradient may be written
// over the logits by this kernel, and the non-coherent cache may only serve memory a kernel does
// not write.
template <typename T>
__device__ __forceinline__ typename ElementBits<T>::type load_bits_streaming(const T* p) {
  return __ldcs(reinterpret_cast<const typename ElementBits<T>::type*>(p));
}

template <typename T>
__device__ __forceinline__ uint4 load_vec_streaming(const T* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// Copies one element global -> shared as raw bits and returns its value.
template <typename T>
__device__ __forceinline__ float copy_element(const T* src, T* dst) {
  using Bits = typename ElementBits<T>::type;
  const Bits b = load_bits_streaming(src);
  *reinterpret_cast<Bits*>(dst) = b;
  return bits_to_float(b, static_cast<T*>(nullptr));
}

template <typename T>
__device__ __forceinline__ float shared_element(const T* p) {
  using Bits = typename ElementBits<T>::type;
  return bits_to_float(*reinterpret_cast<const Bits*>(p), static_cast<T*>(nullptr));
}

// Step 1: this CTA's slice into shared memory, and this thread's softmax stats of what it copied.
template <typename T>
__device__ __forceinline__ ThreadStats load_slice(const T* in_row, const Slice& sl, uint4* smem,
                                                  float c2, int tid) {
  constexpr int kElems = Vec<T>::kElems;
  ThreadStats st;
  const T* src = in_row + sl.lo;
  T* smem_elems = reinterpret_cast<T*>(smem);
  const RowSplit split = split_row<T>(src, sl.count);
  if (tid < split.head) {
    accumulate_one(st, copy_element(src + tid, smem_elems + sl.first + tid), c2);
  }
  const int vectors = static_cast<int>(split.vectors);
  const T* body = src + split.head;
  // src + head is 16-byte aligned, hence so is its shared index first + head (same phase); only
  // used when vectors > 0, i.e. when the head is complete.
  uint4* dst = smem + (sl.first + split.head) / kElems;
  for (int first = tid; first < vectors; first += kFusedUnroll * kFusedThreads) {
    uint4 raw[kFusedUnroll];
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      const int v = first + u * kFusedThreads;
      if (v < vectors) raw[u] = load_vec_streaming(body + static_cast<int64_t>(v) * kElems);
    }
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      const int v = first + u * kFusedThreads;
      if (v < vectors) {
        dst[v] = raw[u];
        float z[kElems];
        unpack_vec<T>(raw[u], z);
        accumulate(st, z, c2);
      }
    }
  }
  if (tid < split.tail) {
    const int k = split.head + vectors * kElems + tid;
    accumulate_one(st, copy_element(src + k, smem_elems + sl.first + k), c2);
  }
  return st;
}

// Bytes [byte_shift, byte_shift + 16) of the 32 bytes lo:hi (lo at the lower address), for
// 0 <= byte_shift < 16 and a multiple of 2: word selects by the two bits of byte_shift / 4 (no
// dynamic register indexing), then a funnel shift by the remaining 0 or 16 bits.
__device__ __forceinline__ uint4 shifted_vec(const uint4& lo, const uint4& hi, int byte_shift) {
  const unsigned int w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const int words = byte_shift >> 2;
  const unsigned int bits = static_cast<unsigned int>(byte_shift & 3) * 8u;
  unsigned int a[6];
#pragma unroll
  for (int i = 0; i < 6; ++i) a[i] = (words & 2) ? w[i + 2] : w[i];
  unsigned int b[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) b[i] = (words & 1) ? a[i + 1] : a[i];
  return make_uint4(__funnelshift_r(b[0], b[1], bits), __funnelshift_r(b[1], b[2], bits),
                    __funnelshift_r(b[2], b[3], bits), __funnelshift_r(b[3], b[4], bits));
}

// Per-row constants of the gradient, as psft_backward.cu's RowGrad.
struct RowGrad {
  float lse;
  float scale;
  float inv_temperature;
};

// As psft_backward.cu's element_grad: x = z / tau rounded on its own, so that where the epilogue
// found lse == x_y exactly (a row with one finite logit) the gradient is exactly 0.
__device__ __forceinline__ float element_grad(float z, const RowGrad& g, bool is_target) {
  return logit_grad(__fmul_rn(z, g.inv_temperature), g.lse, g.scale, is_target);
}

// Step 4: the gradient of this CTA's slice, from shared memory, 16-byte stores on the output's
// grid. kShifted: the output's 16-byte phase differs from the input's (and so from shared
// memory's), so each output vector straddles two shared vectors.
template <typename T, bool kShifted>
__device__ __forceinline__ void write_grad_slice(T* out_row, const Slice& sl, const uint4* smem,
                                                 const RowGrad& g, int64_t target, int tid) {
  constexpr int kElems = Vec<T>::kElems;
  const T* smem_elems = reinterpret_cast<const T*>(smem);
  T* dst = out_row + sl.lo;
  const RowSplit split = split_row<T>(dst, sl.count);
  // The target's index in the slice, or -1 (then no slot below ever matches).
  const int64_t target_rel = target - sl.lo;
  const int target_local =
      (target_rel >= 0 && target_rel < sl.count) ? static_cast<int>(target_rel) : -1;

  if (tid < split.head) {
    const float z = shared_element(smem_elems + sl.first + tid);
    store_element(dst + tid, element_grad(z, g, tid == target_local));
  }

  const int vectors = static_cast<int>(split.vectors);
  const int smem_body = sl.first + split.head;  // shared index of the first body element
  const int q0 = smem_body / kElems;
  const int byte_shift = (smem_body % kElems) * static_cast<int>(sizeof(T));
  const int target_body = target_local < 0 ? -1 : target_local - split.head;  // < 0: not in body
  T* out_body = dst + split.head;
#pragma unroll 2
  for (int v = tid; v < vectors; v += kFusedThreads) {
    uint4 raw = smem[q0 + v];
    // Index q0 + v + 1 is at most chunk_vectors: the pad vector, never read otherwise.
    if constexpr (kShifted) raw = shifted_vec(raw, smem[q0 + v + 1], byte_shift);
    float z[kElems];
    unpack_vec<T>(raw, z);
    const int slot = target_body - v * kElems;  // in [0, kElems) only for the target's vector
    float out[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) out[k] = element_grad(z[k], g, k == slot);
    store_vec(out_body + static_cast<int64_t>(v) * kElems, out);
  }

  if (tid < split.tail) {
    const int k = split.head + vectors * kElems + tid;
    const float z = shared_element(smem_elems + sl.first + k);
    store_element(dst + k, element_grad(z, g, k == target_local));
  }
}

template <typename T>
__device__ __forceinline__ void fill_slice(T* out_row, const Slice& sl, float value, int tid) {
  if (sl.count > 0) fill_row<T, kFusedThreads>(out_row + sl.lo, sl.count, value, tid);
}

__device__ __forceinline__ void write_outputs(const ForwardOutputs& out, int64_t row, float loss,
                                              float logp, float entropy, const TokenLoss& t,
                                              float lse, float correct, float max) {
  out.loss[row] = loss;
  out.logp[row] = logp;
  out.entropy[row] = entropy;
  out.ratio[row] = t.ratio;
  out.log_ratio[row] = t.log_ratio;
  out.clipped[row] = t.clipped;
  out.lse[row] = lse;
  out.coef[row] = t.coef;
  out.correct[row] = correct;
  out.max[row] = max;
}

__device__ __forceinline__ void write_uniform_outputs(const ForwardOutputs& out, int64_t row,
                                                      float value) {
  const TokenLoss t{value, value, value, value, value};
  write_outputs(out, row, value, value, value, t, value, value, value);
}

__device__ __forceinline__ SoftmaxStats shfl_from(const SoftmaxStats& v, int src) {
  return {__shfl_sync(0xffffffffu, v.m, src), __shfl_sync(0xffffffffu, v.s, src),
          __shfl_sync(0xffffffffu, v.w, src)};
}

#endif  // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

template <typename T>
__global__ void __launch_bounds__(kFusedThreads, kFusedCtasPerSm)
    psft_fused_kernel(const FusedArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kElems = Vec<T>::kElems;
  extern __shared__ uint4 smem_slice[];  // chunk_vectors + 1 vectors
  __shared__ SoftmaxStats partials[2];   // this CTA's partial stats, by row parity (read by peers)
  __shared__ SoftmaxStats slots[kFusedThreads / kWarpSize];
  __shared__ float row_consts[2];        // lse, gradient scale: warp 0 -> the block
  __shared__ float target_logit;         // z_y, parked here by thread 0 before the cluster barrier

  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned int cluster_size = cluster.num_blocks();
  const unsigned int rank = cluster.block_rank();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t first_row = blockIdx.x / cluster_size;
  const int64_t row_step = gridDim.x / cluster_size;
  const int64_t vocab = a.in.vocab;
  const float inv_temperature = a.params.inv_temperature;
  const float c2 = inv_temperature * kLog2e;
  const int64_t chunk_elems = a.chunk_vectors * kElems;
  const T* logits = static_cast<const T*>(a.in.logits);
  T* grad = static_cast<T*>(a.grad);
  int parity = 0;

  for (int64_t row = first_row; row < a.in.rows; row += row_step) {
    const T* in_row = logits + row * a.in.row_stride;
    T* out_row = grad + row * vocab;
    const Slice sl = cta_slice(in_row, vocab, chunk_elems, rank);
    // The same value in every thread of every CTA of the cluster: the branches below (and the
    // barriers they skip) are uniform over the cluster.
    const int64_t target = load_target(a.in.targets, a.in.targets_int32, row);
    if (target == a.params.ignore_index) {
      fill_slice(out_row, sl, 0.0f, tid);
      if (rank == 0 && tid == 0) write_uniform_outputs(a.out, row, 0.0f);
      continue;
    }
    // Rejected before launch; never read outside the row if one slips through.
    if (!target_in_range(target, vocab)) {
      fill_slice(out_row, sl, NAN, tid);
      if (rank == 0 && tid == 0) write_uniform_outputs(a.out, row, NAN);
      continue;
    }
    // Issued before the copy so their latency hides behind it.
    float z_target = 0.0f, old_logp = 0.0f, advantage = 0.0f, grad_loss = 0.0f;
    if (tid == 0) {
      z_target = bits_to_float(load_bits_streaming(in_row + target), static_cast<T*>(nullptr));
      grad_loss = a.grad_loss[row];
      if (a.old_logprobs != nullptr) old_logp = a.old_logprobs[row];
      advantage = a.advantages != nullptr ? a.advantages[row] : a.params.advantage;
    }
    // This CTA's threads are done with the previous row's slice and row constants.
    __syncthreads();
    const ThreadStats mine = load_slice(in_row, sl, smem_slice, c2, tid);
    // Consumed before the cluster barrier: z_y is read before any CTA writes the gradient (which
    // matters if the gradient is written in place of the logits).
    if (tid == 0) target_logit = z_target;
    const SoftmaxStats part =
        block_allreduce<kFusedThreads>(to_natural(mine, inv_temperature), MergeStatsOp(), slots);
    if (tid == 0) partials[parity] = part;
    // Release / acquire over the cluster: the partials (and this CTA's slice) are visible.
    cluster.sync();

    if (tid < kWarpSize) {
      SoftmaxStats p = softmax_empty();
      if (static_cast<unsigned int>(tid) < cluster_size) {
        p = *cluster.map_shared_rank(&partials[parity], tid);
      }
      // Rank order 0..C-1, the same in every CTA: bitwise the same stats everywhere.
      SoftmaxStats st = shfl_from(p, 0);
      for (unsigned int r = 1; r < cluster_size; ++r) {
        st = softmax_merge(st, shfl_from(p, static_cast<int>(r)));
      }
      if (tid == 0) {
        // The forward's epilogue.
        const float lse = softmax_lse(st);
        const float logp = target_logp(__fmul_rn(target_logit, inv_temperature), lse);
        const float entropy = softmax_entropy(st);
        const float old = a.old_logprobs != nullptr ? old_logp : logp;
        const TokenLoss t = token_loss(logp, old, advantage, a.params);
        // The target attains the row's maximum: the same x = z / tau rounding on both sides.
        const float correct =
            __fmul_rn(target_logit, inv_temperature) >= st.m ? 1.0f : 0.0f;
        if (rank == 0) write_outputs(a.out, row, t.loss, logp, entropy, t, lse, correct, st.m);
        row_consts[0] = lse;
        row_consts[1] = grad_loss * t.coef * inv_temperature;
      }
    }
    __syncthreads();
    parity ^= 1;

    RowGrad g;
    g.lse = row_consts[0];
    g.scale = row_consts[1];
    g.inv_temperature = inv_temperature;
    if (g.scale == 0.0f) {
      // Clipped rows and a zero upstream gradient; a NaN scale is not 0 and propagates.
      fill_slice(out_row, sl, 0.0f, tid);
    } else if (sl.count > 0) {
      const bool same_phase = ((reinterpret_cast<uintptr_t>(in_row) ^
                                reinterpret_cast<uintptr_t>(out_row)) & 15u) == 0;
      if (same_phase) {
        write_grad_slice<T, false>(out_row, sl, smem_slice, g, target, tid);
      } else {
        write_grad_slice<T, true>(out_row, sl, smem_slice, g, target, tid);
      }
    }
  }
  // No CTA leaves (and frees its shared memory) while a peer may still read its partials.
  cluster.sync();
#else
  // Launched only on sm_90+ (the launcher checks the device).
  __trap();
#endif
}

int element_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kBFloat16:
    case DType::kFloat16:
      return 2;
    default:
      return 0;
  }
}

// Rows of at most this many bytes run as the forward and backward kernels instead: one 512-thread
// CTA per short row would idle most of its threads through five block barriers and a cluster
// barrier per row (the two-kernel pair gives such rows a warp or a 128-thread block). 32 KB is
// where the forward kernel itself moves to 512-thread blocks (PSFT_LAUNCH_SHAPE_SWITCH).
constexpr int64_t kMinFusedRowBytes = 32 * 1024;

// The cluster for a row of `vocab` elements: the smallest C whose slice (for any 16-byte phase of
// the row start) plus the pad vector fits kSmemPerCta. cluster_size = 0 where none does, or
// where the row is short enough for the two kernels.
struct FusedPlan {
  int cluster_size;
  int64_t chunk_vectors;
  size_t smem_bytes;
};

FusedPlan plan_for(DType dtype, int64_t vocab) {
  FusedPlan plan{0, 0, 0};
  const int bytes = element_bytes(dtype);
  if (bytes == 0 || vocab <= 0 || vocab > (int64_t{1} << 40)) return plan;
  if (vocab * bytes <= kMinFusedRowBytes) return plan;
  const int64_t elems = 16 / bytes;
  // Vectors of the 16-byte grid a row can touch: ceil((vocab + pa) / elems) for pa < elems.
  const int64_t row_vectors = (vocab + 2 * (elems - 1)) / elems;
  for (int c = 1; c <= kMaxClusterSize; c *= 2) {
    const int64_t chunk = (row_vectors + c - 1) / c;
    const int64_t smem = (chunk + 1) * 16;
    if (smem <= kSmemPerCta) {
      plan.cluster_size = c;
      plan.chunk_vectors = chunk;
      plan.smem_bytes = static_cast<size_t>(smem);
      return plan;
    }
  }
  return plan;
}

// Device attributes, and the kernel image the current device would run: it must come from sm_90+
// code, not the sm_80 stub (a build whose arch list lacks 9.0a, JIT-compiled from compute_80 PTX
// on a Hopper, would otherwise trap). cudaFuncGetAttributes answers for the current device only,
// so the image is checked where `device` is the current one (the launcher's case). A failed query
// (bad device id, no image for this device) counts as unsupported and is not left behind as the
// thread's last error.
bool query_device_support(int device) {
  int major = 0, cluster_launch = 0, smem_optin = 0, current = -1;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess ||
      cudaGetDevice(&current) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major < 9 || cluster_launch == 0 ||
      static_cast<int64_t>(smem_optin) < kSmemPerCta + kStaticSmemAllowance) {
    return false;
  }
  if (current != device) return true;
  // All dtypes are instantiated for the same architectures: one of them answers for all.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, psft_fused_kernel<float>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
}

// Per-call host work kept to a lookup: the support verdict is queried once per device (from the
// device it is asked about, where the kernel image can be checked), and each kernel's shared
// memory limit is raised once per device, to the largest slice, so concurrent callers with
// different V never lower it under each other.
constexpr int kMaxDevices = 64;

bool device_supports(int device, const FusedPlan& plan) {
  if (plan.cluster_size == 0 || device < 0 || device >= kMaxDevices) return false;
  static std::mutex mutex;
  static int verdict[kMaxDevices] = {};  // 0: not asked yet, 1: supported, -1: not
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  if (verdict[device] == 0) {
    const bool ok = query_device_support(device);
    // An answer from another device has not seen the kernel image: not cached if positive.
    if (!ok || current == device) verdict[device] = ok ? 1 : -1;
    return ok;
  }
  return verdict[device] > 0;
}

template <typename T>
cudaError_t configure_kernel_once(int device) {
  static std::mutex mutex;
  static bool done[kMaxDevices] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (done[device]) return cudaSuccess;
  void (*kernel)(const FusedArgs) = psft_fused_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmemPerCta));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  done[device] = true;
  return cudaSuccess;
}

// How many clusters of this plan are resident at once, per (device, dtype, plan): queried once.
template <typename T>
cudaError_t max_active_clusters(int device, const FusedPlan& plan,
                                const cudaLaunchConfig_t& config, int* clusters) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, plan.cluster_size, plan.smem_bytes);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    *clusters = it->second;
    return cudaSuccess;
  }
  const cudaError_t err = cudaOccupancyMaxActiveClusters(clusters, psft_fused_kernel<T>, &config);
  if (err == cudaSuccess) cache.emplace(key, *clusters);
  return err;
}

cudaError_t unsupported_here() {
  (void)cudaGetLastError();  // a sticky error (a fault of an earlier kernel) stays for the caller
  return cudaErrorNotSupported;
}

template <typename T>
cudaError_t launch_fused(int device, const FusedArgs& args, const FusedPlan& plan,
                         cudaStream_t stream) {
  void (*kernel)(const FusedArgs) = psft_fused_kernel<T>;
  // Until the launch, every failure (the attributes, the occupancy query: e.g. refused under
  // MPS or by a driver without cluster support) means only that this kernel cannot run here:
  // the caller then runs the two-pass kernels. Such errors are not sticky; clear them.
  cudaError_t err = configure_kernel_once<T>(device);
  if (err != cudaSuccess) return unsupported_here();

  cudaLaunchAttribute attrs[1];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = static_cast<unsigned int>(plan.cluster_size);
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned int>(plan.cluster_size), 1, 1);
  config.blockDim = dim3(kFusedThreads, 1, 1);
  config.dynamicSmemBytes = plan.smem_bytes;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 1;

  // A persistent grid of the clusters that are resident at once (clusters must fit in one GPC,
  // so this is what the hardware can hold, not just 2 * SMs / C): an extra cluster that waits
  // for a free GPC slot would run its rows after all others.
  int max_clusters = 0;
  err = max_active_clusters<T>(device, plan, config, &max_clusters);
  if (err != cudaSuccess) return unsupported_here();
  if (max_clusters <= 0) return cudaErrorNotSupported;
  const int64_t clusters = args.in.rows < max_clusters ? args.in.rows : max_clusters;
  config.gridDim = dim3(static_cast<unsigned int>(clusters * plan.cluster_size), 1, 1);
  return cudaLaunchKernelEx(&config, kernel, args);
}

}  // namespace

bool psft_forward_backward_supported(int device, DType dtype, int64_t vocab) {
  return device_supports(device, plan_for(dtype, vocab));
}

cudaError_t launch_psft_forward_backward(const Rows& in, const float* old_logprobs,
                                         const float* advantages, const LossParams& params,
                                         const float* grad_loss, const ForwardOutputs& out,
                                         void* grad_logits, cudaStream_t stream) {
  if (element_bytes(in.dtype) == 0 || in.rows < 0 || in.vocab <= 0) return cudaErrorInvalidValue;
  // Whether it applies does not depend on the number of rows: a caller gets the same answer for
  // an empty batch as for a full one.
  const FusedPlan plan = plan_for(in.dtype, in.vocab);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (!device_supports(device, plan)) return cudaErrorNotSupported;
  if (in.rows == 0) return cudaSuccess;
  // Out of place, rows may overlap (row_stride < V, e.g. an expanded row); in place, each element
  // must be its own gradient's slot.
  const bool in_place = grad_logits == in.logits;
  if (in.logits == nullptr || in.targets == nullptr || in.row_stride < 0 ||
      (in_place && in.rows > 1 && in.row_stride != in.vocab) ||
      grad_loss == nullptr || grad_logits == nullptr || out.loss == nullptr ||
      out.logp == nullptr || out.entropy == nullptr || out.ratio == nullptr ||
      out.log_ratio == nullptr || out.clipped == nullptr || out.lse == nullptr ||
      out.coef == nullptr || out.correct == nullptr || out.max == nullptr) {
    return cudaErrorInvalidValue;
  }
  const FusedArgs args{in, old_logprobs, advantages, params, grad_loss, out, grad_logits,
                       plan.chunk_vectors};
  return PSFT_DTYPE_SWITCH(in.dtype, T,
                           [&] { return launch_fused<T>(device, args, plan, stream); });
}

}  // namespace cuda
}  // namespace psft
