// Packed-sequence batching on plain integer arrays: no torch headers, no Python.
// bindings.cpp wraps these for score_fast._C; score_fast/packing.py is the public API and
// holds a pure-Python twin of each function that must give identical results.
#pragma once
#include <cstdint>
#include <vector>

namespace score_fast {

// First-fit-decreasing bin planning. Items are visited by length descending, ties by
// index ascending; each goes to the lowest-numbered bin with room. Writes the item indices
// grouped by bin (ascending within a bin) to `order` (n entries) and returns the bin
// boundaries in `order` (n_bins + 1 entries). Throws std::invalid_argument on a length
// that is negative or above max_tokens, or max_tokens <= 0.
std::vector<int64_t> plan_bins(const int64_t* lengths, int64_t n, int64_t max_tokens,
                               int64_t* order);

struct PackOut {
  int64_t* input_ids;     // [total] tokens of each bin, back to back
  int64_t* position_ids;  // [total] restarting at 0 for each sequence
  int64_t* segment_ids;   // [total] or nullptr: labels carried through unchanged
  int32_t* cu_seqlens;    // [n + n_bins] one running sum of n_b + 1 entries per bin
  int64_t* token_offsets; // [n_bins + 1] where each bin starts in the outputs above
  int64_t* max_seqlen;    // [n_bins]
};

// Concatenates the sequences of each bin. `ids` holds all sequences back to back with
// `seq_offsets` (n + 1 entries); `segments` is nullptr or laid out like `ids`.
void pack(const int64_t* ids, const int64_t* seq_offsets, int64_t n, const int64_t* segments,
          const int64_t* order, const int64_t* bin_offsets, int64_t n_bins, const PackOut& out);

// Balanced k-way partition by token count (data-parallel ranks), Karmarkar-Karp largest
// differencing. Each item starts as a state of `parts` slots (one holding it, the rest
// empty). Slots within a state are kept stable-sorted by (sum descending, item count
// descending). The two states of largest spread (max - min slot sum; ties: the state
// created first, initial states by id, merged states after them in merge order) are merged
// by pairing slot i of the first with slot parts-1-i of the second. Writes the item indices
// grouped by part (ascending within a part) to `order` (n entries) and returns the part
// boundaries (parts + 1 entries); parts are ordered by token sum descending, ties by
// smallest item index. Every part is non-empty, and the largest part sum exceeds the mean
// by at most the largest item. Throws std::invalid_argument on a negative length, or parts
// < 1 or above n.
std::vector<int64_t> balanced_partition(const int64_t* lengths, int64_t n, int64_t parts,
                                        int64_t* order);

}  // namespace score_fast
