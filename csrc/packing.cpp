#include "packing.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace score_fast {

std::vector<int64_t> plan_bins(const int64_t* lengths, int64_t n, int64_t max_tokens,
                               int64_t* order) {
  if (max_tokens <= 0)
    throw std::invalid_argument("max_tokens must be positive, got " + std::to_string(max_tokens));
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0)
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " +
                                  std::to_string(lengths[i]) + " is negative");
    if (lengths[i] > max_tokens)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + " > max_tokens " +
                                  std::to_string(max_tokens));
  }
  if (n == 0) return {0};

  // Visit order: length descending, index ascending. Lengths are bounded by max_tokens, so
  // a counting sort (O(n + max_tokens)) beats a comparison sort when the budget is small
  // next to n (16k budget, 100k items: ~3x faster than std::stable_sort).
  std::vector<int64_t> visit(n);
  if (max_tokens <= 8 * n) {
    std::vector<int64_t> start(max_tokens + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++start[max_tokens - lengths[i] + 1];
    for (int64_t k = 0; k <= max_tokens; ++k) start[k + 1] += start[k];
    for (int64_t i = 0; i < n; ++i) visit[start[max_tokens - lengths[i]]++] = i;
  } else {
    std::iota(visit.begin(), visit.end(), 0);
    std::stable_sort(visit.begin(), visit.end(),
                     [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  }

  // Max-segment-tree over the remaining room of n potential bins, all starting full:
  // bins open left to right, so the leftmost leaf with room is either an open bin or the
  // next new one. O(n log n) instead of first fit's O(n * bins) (125k bins at 1M items).
  // First fit never leaves two bins both at most half full (the later bin's items would
  // have fit the earlier one), so it opens fewer than 2 * total / max_tokens + 1 bins:
  // sizing the tree by that bound instead of n makes it ~4x smaller for 16..4096 lengths.
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += lengths[i];
  const int64_t max_bins = std::min(n, 2 * (total / max_tokens) + 2);
  int64_t leaves = 1;
  while (leaves < max_bins) leaves <<= 1;
  std::vector<int64_t> room(2 * leaves, max_tokens);
  std::vector<int64_t> bin_of(n);
  int64_t n_bins = 0;
  for (int64_t item : visit) {
    const int64_t len = lengths[item];
    int64_t node = 1;
    while (node < leaves) node = room[2 * node] >= len ? 2 * node : 2 * node + 1;
    const int64_t bin = node - leaves;
    bin_of[item] = bin;
    n_bins = std::max(n_bins, bin + 1);
    room[node] -= len;
    for (node >>= 1; node >= 1; node >>= 1)
      room[node] = std::max(room[2 * node], room[2 * node + 1]);
  }

  // Counting sort by bin; scanning items in index order keeps each bin ascending.
  std::vector<int64_t> bin_offsets(n_bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++bin_offsets[bin_of[i] + 1];
  for (int64_t b = 0; b < n_bins; ++b) bin_offsets[b + 1] += bin_offsets[b];
  std::vector<int64_t> cursor(bin_offsets.begin(), bin_offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) order[cursor[bin_of[i]]++] = i;
  return bin_offsets;
}

void pack(const int64_t* ids, const int64_t* seq_offsets, int64_t n, const int64_t* segments,
          const int64_t* order, const int64_t* bin_offsets, int64_t n_bins, const PackOut& out) {
  out.token_offsets[0] = 0;
  for (int64_t b = 0; b < n_bins; ++b) {
    int64_t tokens = 0, longest = 0;
    int32_t* cu = out.cu_seqlens + bin_offsets[b] + b;  // bin b owns n_b + 1 entries
    cu[0] = 0;
    for (int64_t k = bin_offsets[b]; k < bin_offsets[b + 1]; ++k) {
      const int64_t s = order[k];
      if (s < 0 || s >= n) throw std::invalid_argument("bin plan names sequence " +
                                                       std::to_string(s) + " of " +
                                                       std::to_string(n));
      const int64_t len = seq_offsets[s + 1] - seq_offsets[s];
      const int64_t dst = out.token_offsets[b] + tokens;
      std::copy(ids + seq_offsets[s], ids + seq_offsets[s + 1], out.input_ids + dst);
      if (segments)
        std::copy(segments + seq_offsets[s], segments + seq_offsets[s + 1], out.segment_ids + dst);
      std::iota(out.position_ids + dst, out.position_ids + dst + len, int64_t{0});
      tokens += len;
      longest = std::max(longest, len);
      cu[k - bin_offsets[b] + 1] = static_cast<int32_t>(tokens);
    }
    out.token_offsets[b + 1] = out.token_offsets[b] + tokens;
    out.max_seqlen[b] = longest;
  }
}

}  // namespace score_fast
