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

namespace {

// One slot of a Karmarkar-Karp state: a would-be part. Its units form a linked list
// through `next` (head/tail -1 while empty), so merging two slots is O(1).
struct Slot {
  int64_t sum, count, head, tail;
};

// Slot order within a state: sum descending, then item count descending (so empty slots
// come last and the pairing fills them first). Ties beyond that keep their order.
inline bool heavier(const Slot& a, const Slot& b) {
  return a.sum != b.sum ? a.sum > b.sum : a.count > b.count;
}

// A state in the heap: `parts` slots stored at pool[block * parts], or, while block < 0, a
// singleton holding only item `unit` (not materialised: n items x parts slots would not fit).
struct State {
  int64_t spread, id, block, unit;
};

// Max-heap order: largest spread first, ties by smallest id (the state created first).
struct PopsLater {
  bool operator()(const State& a, const State& b) const {
    return a.spread != b.spread ? a.spread < b.spread : a.id > b.id;
  }
};

// Any stable sort gives the same order as the Python twin's list.sort (stable too).
void sort_slots(Slot* s, int64_t k) {
  if (k > 32) {
    std::stable_sort(s, s + k, heavier);
    return;
  }
  for (int64_t i = 1; i < k; ++i) {
    const Slot x = s[i];
    int64_t j = i;
    for (; j > 0 && heavier(x, s[j - 1]); --j) s[j] = s[j - 1];
    s[j] = x;
  }
}

// Item ids ordered by weight descending, ties by id ascending. Weights are token counts,
// usually small next to the item count: a counting sort then (as plan_bins), ~5x faster
// than a comparison sort of 100k items; std::stable_sort otherwise.
std::vector<int64_t> rank_heaviest_first(const std::vector<int64_t>& weight) {
  const int64_t m = static_cast<int64_t>(weight.size());
  std::vector<int64_t> ranked(m);
  const int64_t top = m ? *std::max_element(weight.begin(), weight.end()) : 0;
  if (top <= 8 * m) {
    std::vector<int64_t> start(top + 2, 0);
    auto key = [&](int64_t u) { return top - weight[u]; };
    for (int64_t u = 0; u < m; ++u) ++start[key(u) + 1];
    for (int64_t w = 0; w <= top; ++w) start[w + 1] += start[w];
    for (int64_t u = 0; u < m; ++u) ranked[start[key(u)]++] = u;
  } else {
    std::iota(ranked.begin(), ranked.end(), 0);
    std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t b) {
      return weight[a] > weight[b];
    });
  }
  return ranked;
}

}  // namespace

std::vector<int64_t> balanced_partition(const int64_t* lengths, int64_t n, int64_t parts,
                                        int64_t* order) {
  if (parts < 1) throw std::invalid_argument("parts must be >= 1, got " + std::to_string(parts));
  for (int64_t i = 0; i < n; ++i)
    if (lengths[i] < 0)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + " is negative");
  if (parts > n)
    throw std::invalid_argument("parts = " + std::to_string(parts) + " > " + std::to_string(n) +
                                " items: every part needs at least one");
  const int64_t m = n;
  const std::vector<int64_t> weight(lengths, lengths + n);

  const int64_t k = parts;
  std::vector<int64_t> next(m, -1);
  std::vector<Slot> pool;
  std::vector<int64_t> free_blocks;
  auto alloc = [&]() -> int64_t {
    if (!free_blocks.empty()) {
      const int64_t b = free_blocks.back();
      free_blocks.pop_back();
      return b;
    }
    pool.resize(pool.size() + k);
    return static_cast<int64_t>(pool.size()) / k - 1;
  };
  auto slot = [&](const State& s, int64_t i) -> Slot {
    if (s.block >= 0) return pool[s.block * k + i];
    return i == 0 ? Slot{weight[s.unit], 1, s.unit, s.unit} : Slot{0, 0, -1, -1};
  };

  // Initial states go to `queue`, sorted in pop order; merged states to a heap. Each pop
  // takes whichever front comes first: the same order as one heap of everything, but most
  // pops are O(1) (one heap of 100k singletons made the heap ~45% of the time).
  std::vector<State> queue;
  // A singleton's spread is its weight (0 with one part: then id order is pop order).
  queue.reserve(m);
  if (k > 1) {
    for (int64_t u : rank_heaviest_first(weight))
      queue.push_back(State{weight[u], u, -1, u});
  } else {
    for (int64_t u = 0; u < m; ++u) queue.push_back(State{0, u, -1, u});
  }
  int64_t next_id = m;
  std::vector<State> heap;
  heap.reserve(queue.size());
  size_t front = 0;
  auto pop = [&]() -> State {
    if (front < queue.size() && (heap.empty() || PopsLater{}(heap.front(), queue[front])))
      return queue[front++];
    std::pop_heap(heap.begin(), heap.end(), PopsLater{});
    const State s = heap.back();
    heap.pop_back();
    return s;
  };

  // Largest differencing: merge the two states of largest spread, the first one's slot i
  // with the second one's slot k-1-i (heaviest with lightest).
  std::vector<Slot> tmp(k);
  while (queue.size() - front + heap.size() > 1) {
    const State a = pop();
    const State b = pop();
    for (int64_t i = 0; i < k; ++i) {
      const Slot x = slot(a, i), y = slot(b, k - 1 - i);
      Slot z{x.sum + y.sum, x.count + y.count, x.head, x.tail};
      if (x.head < 0) {
        z.head = y.head;
        z.tail = y.tail;
      } else if (y.head >= 0) {
        next[x.tail] = y.head;
        z.tail = y.tail;
      }
      tmp[i] = z;
    }
    sort_slots(tmp.data(), k);
    const int64_t block = a.block >= 0 ? a.block : b.block >= 0 ? b.block : alloc();
    if (b.block >= 0 && b.block != block) free_blocks.push_back(b.block);
    std::copy(tmp.begin(), tmp.end(), pool.begin() + block * k);
    heap.push_back(State{tmp[0].sum - tmp[k - 1].sum, next_id++, block, -1});
    std::push_heap(heap.begin(), heap.end(), PopsLater{});
  }
  const State last = pop();

  // Slots -> items; parts renumbered by (token sum descending, first item).
  std::vector<int64_t> part_of_item(m, -1);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t u = slot(last, i).head; u >= 0; u = next[u]) part_of_item[u] = i;
  std::vector<int64_t> sums(k, 0), first(k, n), count(k, 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = part_of_item[j];
    sums[p] += lengths[j];
    first[p] = std::min(first[p], j);
    ++count[p];
  }
  std::vector<int64_t> rank(k), new_of(k);
  std::iota(rank.begin(), rank.end(), 0);
  std::sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) {
    return sums[a] != sums[b] ? sums[a] > sums[b] : first[a] < first[b];
  });
  std::vector<int64_t> offsets(k + 1, 0);
  for (int64_t r = 0; r < k; ++r) {
    new_of[rank[r]] = r;
    offsets[r + 1] = offsets[r] + count[rank[r]];
  }
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t j = 0; j < n; ++j)
    order[cursor[new_of[part_of_item[j]]]++] = j;
  return offsets;
}

}  // namespace score_fast
