// The fused end of a latent step: final norm of (x + residual) -> the thought, written both as the step's
// output and as the next step's input embedding; then each live row (slot >= 0) advances its position,
// context length and cache slot, so a captured thought loop needs no host work between steps.
//
// One thread block per row. The sum is rounded to the model dtype before the norm, as HF adds the
// residual in the model dtype; RMSNorm rounds before the weight, as HF Llama does.
#include <type_traits>

#include "vec.cuh"

namespace coconut {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result.
__device__ float block_sum(float value, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) value += __shfl_xor_sync(0xffffffffu, value, off);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

template <typename T>
__device__ __forceinline__ float summed(const LatentFeedbackArgs& a, int row, int i) {
  const float x = to_float(static_cast<const T*>(a.x)[row * a.stride_x + i]);
  const float r = to_float(static_cast<const T*>(a.residual)[row * a.stride_r + i]);
  return to_float(from_float<T>(x + r));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) latent_feedback_kernel(const LatentFeedbackArgs a) {
  __shared__ float scratch[kThreads / 32];
  const int row = blockIdx.x;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* thought = static_cast<T*>(a.thought_out) + row * a.stride_t;
  T* next = static_cast<T*>(a.next_embeds) + row * a.stride_e;

  float mean = 0.f;
  if (!a.rms) {
    float s = 0.f;
    for (int i = threadIdx.x; i < a.hidden; i += kThreads) s += summed<T>(a, row, i);
    mean = block_sum(s, scratch) / a.hidden;
  }
  float sq = 0.f;
  for (int i = threadIdx.x; i < a.hidden; i += kThreads) {
    const float c = summed<T>(a, row, i) - mean;
    sq += c * c;
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / a.hidden + a.eps);
  for (int i = threadIdx.x; i < a.hidden; i += kThreads) {
    const float c = (summed<T>(a, row, i) - mean) * inv;
    float out;
    if (a.rms) {
      out = to_float(from_float<T>(c)) * to_float(weight[i]);
    } else {
      out = c * to_float(weight[i]) + (bias != nullptr ? to_float(bias[i]) : 0.f);
    }
    const T value = from_float<T>(out);
    thought[i] = value;
    next[i] = value;
  }
  if (threadIdx.x == 0 && a.slot_mapping[row] >= 0) {
    const int64_t position = a.positions[row] + 1;
    a.positions[row] = position;
    a.context_lens[row] += 1;
    // a row at the last position steps one column past the table: clamp, as the torch reference does
    const int64_t column = min(position / a.block_size, static_cast<int64_t>(a.max_blocks - 1));
    const int64_t block = a.block_tables[row * a.stride_bt + column];
    a.slot_mapping[row] = block * a.block_size + position % a.block_size;
  }
}

}  // namespace

cudaError_t latent_feedback(const LatentFeedbackArgs& a, DType dtype, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    latent_feedback_kernel<T><<<a.rows, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace coconut
