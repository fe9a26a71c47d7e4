// score_fast._C: pybind11 bindings for csrc/packing.cpp. Inputs are numpy arrays (torch
// tensors reach here through .numpy(), and results go back through torch.from_numpy, so
// nothing is copied at the boundary). Every call drops the GIL while it computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "packing.h"

namespace py = pybind11;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

#define CHECK_1D(a, name)                                                                   \
  if ((a).ndim() != 1)                                                                      \
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " +                \
                                std::to_string((a).ndim()) + " dimensions")
#define CHECK_LEN(a, name, n)                                                               \
  if ((a).shape(0) != (n))                                                                  \
    throw std::invalid_argument(std::string(name) + " has " + std::to_string((a).shape(0)) + \
                                " entries, expected " + std::to_string(n))

// An optional integer array argument: None gives an empty array (callers test `is_none()`
// on the original object, never the array), anything else must be 1-D of length n.
static I64 optional_i64(const py::object& obj, const char* name, int64_t n) {
  I64 a;
  if (obj.is_none()) return a;
  a = I64::ensure(obj);
  if (!a) throw std::invalid_argument(std::string(name) + " must be an integer array");
  CHECK_1D(a, name);
  CHECK_LEN(a, name, n);
  return a;
}

static py::tuple plan_bins(const I64& lengths, int64_t max_tokens) {
  CHECK_1D(lengths, "lengths");
  const int64_t n = lengths.shape(0);
  I64 order(n);
  std::vector<int64_t> offsets;
  {
    py::gil_scoped_release nogil;
    offsets = score_fast::plan_bins(lengths.data(), n, max_tokens, order.mutable_data());
  }
  I64 bin_offsets(static_cast<py::ssize_t>(offsets.size()));
  std::copy(offsets.begin(), offsets.end(), bin_offsets.mutable_data());
  return py::make_tuple(order, bin_offsets);
}

static py::tuple pack(const I64& ids, const I64& seq_offsets, const py::object& segments,
                      const I64& order, const I64& bin_offsets) {
  CHECK_1D(ids, "ids");
  CHECK_1D(seq_offsets, "seq_offsets");
  CHECK_1D(order, "order");
  CHECK_1D(bin_offsets, "bin_offsets");
  const int64_t n = seq_offsets.shape(0) - 1;
  const int64_t n_bins = bin_offsets.shape(0) - 1;
  if (n < 0 || n_bins < 0) throw std::invalid_argument("offset arrays must not be empty");
  CHECK_LEN(order, "order", n);
  const int64_t total = ids.shape(0);
  if (seq_offsets.at(0) != 0 || seq_offsets.at(n) != total)
    throw std::invalid_argument("seq_offsets must run from 0 to len(ids) = " + std::to_string(total));
  if (bin_offsets.at(0) != 0 || bin_offsets.at(n_bins) != n)
    throw std::invalid_argument("bin_offsets must run from 0 to len(order) = " + std::to_string(n));
  const bool has_seg = !segments.is_none();
  const I64 seg = optional_i64(segments, "segments", total);
  I64 input_ids(total), position_ids(total), token_offsets(n_bins + 1), max_seqlen(n_bins);
  I64 segment_ids(has_seg ? total : 0);
  py::array_t<int32_t> cu_seqlens(n + n_bins);
  score_fast::PackOut out{input_ids.mutable_data(), position_ids.mutable_data(),
                          has_seg ? segment_ids.mutable_data() : nullptr, cu_seqlens.mutable_data(),
                          token_offsets.mutable_data(), max_seqlen.mutable_data()};
  {
    py::gil_scoped_release nogil;
    score_fast::pack(ids.data(), seq_offsets.data(), n, has_seg ? seg.data() : nullptr, order.data(),
                     bin_offsets.data(), n_bins, out);
  }
  return py::make_tuple(input_ids, position_ids, has_seg ? py::object(segment_ids) : py::none(),
                        cu_seqlens, token_offsets, max_seqlen);
}

static py::tuple balanced_partition(const I64& lengths, int64_t parts) {
  CHECK_1D(lengths, "lengths");
  const int64_t n = lengths.shape(0);
  I64 order(n);
  std::vector<int64_t> offsets;
  {
    py::gil_scoped_release nogil;
    offsets = score_fast::balanced_partition(lengths.data(), n, parts, order.mutable_data());
  }
  I64 part_offsets(static_cast<py::ssize_t>(offsets.size()));
  std::copy(offsets.begin(), offsets.end(), part_offsets.mutable_data());
  return py::make_tuple(order, part_offsets);
}

// Splits values (any dtype, first axis = packed tokens) at cu_seqlens into views that keep
// `values` alive: no copy.
static py::list unpack(const py::array& values, const py::array_t<int64_t, py::array::forcecast>& cu) {
  CHECK_1D(cu, "cu_seqlens");
  if (values.ndim() < 1) throw std::invalid_argument("values must have at least 1 dimension");
  const int64_t n = cu.shape(0) - 1;
  const int64_t tokens = values.shape(0);
  if (n < 0 || cu.at(0) != 0 || cu.at(n) != tokens)
    throw std::invalid_argument("values has " + std::to_string(tokens) +
                                " tokens but cu_seqlens ends at " +
                                std::to_string(n < 0 ? -1 : cu.at(n)));
  std::vector<py::ssize_t> shape(values.shape(), values.shape() + values.ndim());
  std::vector<py::ssize_t> strides(values.strides(), values.strides() + values.ndim());
  auto* base = static_cast<const char*>(values.data());
  py::list pieces;
  for (int64_t i = 0; i < n; ++i) {
    if (cu.at(i + 1) < cu.at(i)) throw std::invalid_argument("cu_seqlens must not decrease");
    shape[0] = cu.at(i + 1) - cu.at(i);
    pieces.append(py::array(values.dtype(), shape, strides, base + cu.at(i) * strides[0], values));
  }
  return pieces;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "score_fast native packing (first-fit-decreasing bins, pack, unpack, balanced k-way "
            "partition)";
  m.def("plan_bins", &plan_bins, py::arg("lengths"), py::arg("max_tokens"),
        "-> (order int64[n], bin_offsets int64[n_bins+1])");
  m.def("pack", &pack, py::arg("ids"), py::arg("seq_offsets"), py::arg("segments"),
        py::arg("order"), py::arg("bin_offsets"),
        "-> (input_ids, position_ids, segment_ids|None, cu_seqlens, token_offsets, max_seqlen)");
  m.def("unpack", &unpack, py::arg("values"), py::arg("cu_seqlens"));
  m.def("balanced_partition", &balanced_partition, py::arg("lengths"), py::arg("parts"),
        "-> (order int64[n], part_offsets int64[parts+1])");
}
