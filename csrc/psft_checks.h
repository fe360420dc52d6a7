// Argument checks of the ops, shared by every device: a bad call raises a Python ValueError /
// TypeError naming the argument and the problem before any kernel reads memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>

#include "psft_math.h"

namespace psft {

// Message pieces. Numbers are formatted with snprintf, never through an iostream: on one GPU
// machine (its g++ 13 headers, an older libstdc++ at run time) iostream number formatting inlined
// into the extension crashed inside the check that was reporting a bad target id.
std::string str_of(int64_t v);
std::string str_of(double v);
std::string str_of(at::IntArrayRef sizes);
std::string str_of(at::ScalarType t);
std::string str_of(const c10::Device& d);

// The ValueError for target id `id` at flat position `pos`, outside [0, vocab).
[[noreturn]] void raise_bad_target(int64_t id, int64_t pos, int64_t vocab, int64_t ignore_index,
                                   const char* op);

// logits (N, V) of a supported dtype and targets (N,) int64 / int32 on its device, every target
// ignore_index or in [0, V). The range check reads the targets: a scan on the CPU, one small
// kernel and an 8-byte read-back (the call's one sync) on a GPU.
void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t ignore_index, const char* op);

// The same without reading the targets (the backward: the forward checked their range).
void check_logits_and_targets_layout(const at::Tensor& logits, const at::Tensor& targets,
                                     const char* op);

// A per-token float32 (N,) tensor on the logits' device (any stride).
void check_per_token(const at::Tensor& t, const at::Tensor& logits, const char* what,
                     const char* op);
void check_per_token(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                     const char* what, const char* op);

// The packed hyper-parameters (psft_ext.LossParams' layout, psft_math.h), checked and unpacked.
LossParams checked_params(c10::ArrayRef<double> packed, int64_t ignore_index, const char* op);

// A gradient output for the logits: dense (N, V), the logits' dtype and device. It may be the
// logits themselves, which must then be dense too.
void check_grad_output(const at::Tensor& grad, const at::Tensor& logits, const char* op);

// The forward's stats, as the backward reads them: float32 (kTokenStats, N), rows contiguous.
void check_stats(const at::Tensor& stats, const at::Tensor& logits, const char* op);

// scale_rows_: a dense (N, V) gradient of a logits dtype and a float32 (N,) factor on its device.
void check_scale_rows_inputs(const at::Tensor& grad, const at::Tensor& factor, const char* op);

// Logits the kernels can read: a row's elements contiguous (copied otherwise); rows may be
// strided.
at::Tensor rows_with_unit_stride(const at::Tensor& logits);

}  // namespace psft
