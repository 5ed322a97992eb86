// Compiled core of specjax.drafters.suffix_index: the suffix automaton and the draft builders.
//
// A line-by-line port of the pure-Python reference (drafters/suffix_reference.py: SuffixAutomaton,
// draft_merged and NodeCalibration.learn; drafters/suffix_index.py: SuffixIndex._best_draft and the
// candidate walk of SuffixIndex._budgeted_draft). It must produce bit-identical drafts: the same
// arithmetic in the same order (built with -ffp-contract=off so no multiply-add is fused), the same
// total orders for heaps and rankings, and the calibration read from and written to the same Python
// dict. Plain CPython C API, so building it needs nothing but setuptools and a C++17 compiler.
//
// Hostile input never kills the interpreter: the Python glue (the end of this file) checks every
// argument before the core sees it (types, ranges, states, lengths, finite floats) and raises
// TypeError, ValueError or IndexError naming it, and every C++ exception becomes a Python exception
// (tests/test_suffix_core_fuzz.py drives each entry point with hostile arguments in a subprocess).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int32_t kRoot = 0;
constexpr int32_t kNoEdge = -1;
constexpr int32_t kBranches = -2;  // edge_target then indexes Automaton::branch_maps
constexpr double kTieTolerance = 1e-9;
constexpr size_t kRankedCacheLimit = size_t(1) << 16;
// Rankings keep their best kRankedTop children: a draft only reads children with a count ratio of at
// least min_token_prob (at most 1 / min_token_prob of them), and a full sort of a short suffix's
// thousands of children, redone each time it occurs again, was the slowest step of a draft.
constexpr size_t kRankedTop = 16;

struct Child {
  int32_t count;
  int64_t stamp;
  int32_t token;
  int32_t state;
};

// Most frequent first, then most recent, then the larger token and state (Python's reverse tuple sort).
bool ranks_before(const Child& a, const Child& b) {
  if (a.count != b.count) return a.count > b.count;
  if (a.stamp != b.stamp) return a.stamp > b.stamp;
  if (a.token != b.token) return a.token > b.token;
  return a.state > b.state;
}

int bit_length(int64_t x) { return x <= 0 ? 0 : 64 - __builtin_clzll(static_cast<uint64_t>(x)); }

int ratio_bin(double ratio) {
  return ratio >= 1.0 ? 4 : ratio >= 0.5 ? 3 : ratio >= 0.25 ? 2 : ratio >= 0.1 ? 1 : 0;
}

struct Automaton {
  int64_t count_depth;
  // One record per state (one cache line holds two): a draft walks suffix paths through memory that other
  // work has evicted from the caches, and separate arrays cost a miss per field.
  struct State {
    int64_t stamp;  // clock of the latest occurrence
    int32_t length, link, count;
    int32_t edge_token;  // the only transition's token, or kNoEdge / kBranches
    int32_t edge_target;  // its target, or (kBranches) the index into branch_maps
  };
  std::vector<State> states{State{0, 0, -1, 0, kNoEdge, 0}};
  int32_t& length(int32_t s) { return states[static_cast<size_t>(s)].length; }
  int32_t& link(int32_t s) { return states[static_cast<size_t>(s)].link; }
  int32_t& count(int32_t s) { return states[static_cast<size_t>(s)].count; }
  int32_t& edge_token(int32_t s) { return states[static_cast<size_t>(s)].edge_token; }
  int32_t& edge_target(int32_t s) { return states[static_cast<size_t>(s)].edge_target; }
  int64_t& stamp(int32_t s) { return states[static_cast<size_t>(s)].stamp; }
  int32_t length(int32_t s) const { return states[static_cast<size_t>(s)].length; }
  int32_t link(int32_t s) const { return states[static_cast<size_t>(s)].link; }
  int32_t count(int32_t s) const { return states[static_cast<size_t>(s)].count; }
  int32_t edge_token(int32_t s) const { return states[static_cast<size_t>(s)].edge_token; }
  int32_t edge_target(int32_t s) const { return states[static_cast<size_t>(s)].edge_target; }
  int64_t stamp(int32_t s) const { return states[static_cast<size_t>(s)].stamp; }
  std::vector<std::unordered_map<int32_t, int32_t>> branch_maps;
  int64_t clock = 0;
  struct Ranking {
    int64_t clock;  // when ranked: valid while the state has not occurred since (see top_ranking)
    bool truncated;  // more live children than top holds
    std::vector<Child> top;
  };
  std::unordered_map<int32_t, Ranking> ranked;
  std::vector<Child> full_scratch;
  int32_t last = kRoot, window = kRoot;
  int64_t written = 0;
  // Set while a budgeted draft reads this automaton: a calibration lookup (Python code) must not mutate it
  // under the draft's references into its rankings.
  int busy = 0;
  // Set when an exception interrupted an append: the structure may be half-updated, so it is not read again.
  bool broken = false;

  explicit Automaton(int64_t depth) : count_depth(depth) {}

  int32_t child(int32_t state, int32_t token) const {
    int32_t edge = edge_token(state);
    if (edge == token) return edge_target(state);
    if (edge == kBranches) {
      const auto& targets = branch_maps[edge_target(state)];
      auto it = targets.find(token);
      return it == targets.end() ? -1 : it->second;
    }
    return -1;
  }

  int32_t new_state(int32_t len, int32_t lnk, int32_t cnt, int64_t stp) {
    if (states.size() >= static_cast<size_t>(INT32_MAX)) throw std::length_error("more than 2**31 - 1 states");
    states.push_back(State{stp, len, lnk, cnt, kNoEdge, 0});
    return static_cast<int32_t>(states.size()) - 1;
  }

  int32_t split(int32_t p, int32_t q, int32_t token) {
    int32_t clone = new_state(length(p) + 1, link(q), count(q), stamp(q));
    edge_token(clone) = edge_token(q);
    if (edge_token(q) == kBranches) {
      std::unordered_map<int32_t, int32_t> copy = branch_maps[edge_target(q)];
      branch_maps.push_back(std::move(copy));
      edge_target(clone) = static_cast<int32_t>(branch_maps.size()) - 1;
    } else {
      edge_target(clone) = edge_target(q);
    }
    link(q) = clone;
    while (p != -1) {
      int32_t edge = edge_token(p);
      if (edge == token) {
        if (edge_target(p) != q) break;
        edge_target(p) = clone;
      } else if (edge == kBranches) {
        auto& targets = branch_maps[edge_target(p)];
        auto it = targets.find(token);
        if (it == targets.end() || it->second != q) break;
        it->second = clone;
      } else {
        break;
      }
      p = link(p);
    }
    return clone;
  }

  void link_new_state(int32_t p, int32_t token, int32_t cur) {
    int32_t q = -1;
    while (p != -1) {
      int32_t edge = edge_token(p);
      if (edge == kNoEdge) {
        edge_token(p) = token;
        edge_target(p) = cur;
      } else if (edge == kBranches) {
        auto& targets = branch_maps[edge_target(p)];
        auto inserted = targets.emplace(token, cur);
        if (!inserted.second) {
          q = inserted.first->second;
          break;
        }
      } else if (edge == token) {
        q = edge_target(p);
        break;
      } else {
        branch_maps.emplace_back();
        auto& targets = branch_maps.back();
        targets.emplace(edge, edge_target(p));
        targets.emplace(token, cur);
        edge_token(p) = kBranches;
        edge_target(p) = static_cast<int32_t>(branch_maps.size()) - 1;
      }
      p = link(p);
    }
    if (p == -1) return;  // cur's link stays the root
    link(cur) = length(p) + 1 == length(q) ? q : split(p, q, token);
  }

  void extend(const std::vector<int32_t>& tokens) {
    const int64_t shorter = count_depth - 1;
    for (int32_t token : tokens) {
      int32_t q = child(last, token);
      int32_t cur;
      if (q >= 0) {
        cur = length(q) == length(last) + 1 ? q : split(last, q, token);
      } else {
        cur = new_state(length(last) + 1, 0, 0, 0);
        link_new_state(last, token, cur);
      }
      last = cur;
      written += 1;
      if (written <= count_depth) {
        window = cur;
      } else {
        while (length(link(window)) >= shorter) window = link(window);
        window = child(window, token);
      }
      clock += 1;
      for (int32_t state = window; state > kRoot; state = link(state)) {
        count(state) += 1;
        stamp(state) = clock;
      }
    }
  }

  void end_sequence() {
    last = window = kRoot;
    written = 0;
  }

  // Calls visit(state) for every count that removing ``tokens`` lowers, in order, until visit returns false.
  // Returns the index of the first token without a transition (the walk stops there), else -1.
  template <typename Visit>
  int64_t walk_removal(const std::vector<int32_t>& tokens, Visit visit) const {
    int32_t state = kRoot;
    int64_t matched = 0;
    for (size_t i = 0; i < tokens.size(); ++i) {
      state = child(state, tokens[i]);
      if (state < 0) return static_cast<int64_t>(i);
      matched += 1;
      if (matched > count_depth) {
        matched = count_depth;
        if (length(link(state)) >= count_depth) state = link(state);
      }
      for (int32_t suffix = state; suffix > kRoot; suffix = link(suffix)) {
        if (!visit(suffix)) return -1;
      }
    }
    return -1;
  }

  // Subtracts one previously added sequence. Tokens that were never added (a missing transition, or a count
  // that would fall below zero) change nothing: returns the index of the token without a transition, or
  // the state whose count ran out as -2 - state, else -1.
  int64_t remove(const std::vector<int32_t>& tokens) {
    int64_t missing = walk_removal(tokens, [](int32_t) { return true; });
    if (missing >= 0) return missing;
    int64_t lowered = 0;
    int32_t exhausted = -1;
    walk_removal(tokens, [&](int32_t state) {
      if (count(state) <= 0) {
        exhausted = state;
        return false;
      }
      count(state) -= 1;
      lowered += 1;
      return true;
    });
    if (exhausted >= 0) {  // undo: the same walk, as far as it went
      walk_removal(tokens, [&](int32_t state) {
        if (lowered == 0) return false;
        count(state) += 1;
        lowered -= 1;
        return true;
      });
      return -2 - static_cast<int64_t>(exhausted);
    }
    ranked.clear();
    return -1;
  }

  int64_t count_of(const std::vector<int32_t>& pattern) const {
    int32_t state = kRoot;
    for (int32_t token : pattern) {
      state = child(state, token);
      if (state < 0) return 0;
    }
    return count(state);
  }

  void advance(int32_t& state, int64_t& matched, const int32_t* tokens, size_t n, int64_t max_len) const {
    for (size_t i = 0; i < n; ++i) {
      int32_t token = tokens[i];
      while (true) {
        int32_t next = child(state, token);
        if (next >= 0 && count(next) > 0) {
          state = next;
          matched += 1;
          break;
        }
        if (state == kRoot) {
          matched = 0;
          break;
        }
        state = link(state);
        matched = length(state);
      }
      if (matched > max_len) {
        matched = max_len;
        if (length(link(state)) >= max_len) state = link(state);
      }
    }
  }

  int32_t suffix_of_length(int32_t state, int64_t max_len) const {
    while (state > kRoot && length(link(state)) >= max_len) state = link(state);
    return state;
  }

  // Heap bytes held (vector capacities, hash tables with their nodes at a malloc'd 32 bytes each): tracemalloc
  // does not see them, so the replay's memory report adds them.
  size_t memory_bytes() const {
    size_t bytes = states.capacity() * sizeof(State) + branch_maps.capacity() * sizeof(branch_maps[0]);
    for (const auto& targets : branch_maps) bytes += targets.bucket_count() * sizeof(void*) + targets.size() * 32;
    bytes += ranked.bucket_count() * sizeof(void*);
    for (const auto& entry : ranked) bytes += 64 + entry.second.top.capacity() * sizeof(Child);
    return bytes;
  }

  bool has_live_child(int32_t state) const {
    int32_t edge = edge_token(state);
    if (edge >= 0) return count(edge_target(state)) > 0;
    if (edge != kBranches) return false;
    for (const auto& kv : branch_maps[edge_target(state)]) {
      if (count(kv.second) > 0) return true;
    }
    return false;
  }

  void live_children(int32_t state, std::vector<Child>& out) const {
    int32_t edge = edge_token(state);
    if (edge >= 0) {
      int32_t target = edge_target(state);
      if (count(target) > 0) out.push_back({count(target), stamp(target), edge, target});
    } else if (edge == kBranches) {
      const auto& targets = branch_maps[edge_target(state)];
      out.reserve(out.size() + targets.size());
      for (const auto& kv : targets) {
        if (count(kv.second) > 0) out.push_back({count(kv.second), stamp(kv.second), kv.first, kv.second});
      }
    }
  }

  // Every live continuation, most frequent (then most recent) first: the reference's ranked_children.
  void full_ranking(int32_t state, std::vector<Child>& out) const {
    out.clear();
    live_children(state, out);
    std::sort(out.begin(), out.end(), ranks_before);
  }

  // The best kRankedTop continuations, cached under the reference's validity rule: a ranking stays
  // valid while the state does not occur again (or nothing was appended since it was made).
  const Ranking& top_ranking(int32_t state) {
    auto it = ranked.find(state);
    if (it != ranked.end() && (stamp(state) < it->second.clock || it->second.clock == clock)) return it->second;
    std::vector<Child> out;
    live_children(state, out);
    bool truncated = out.size() > kRankedTop;
    if (truncated) {
      std::partial_sort(out.begin(), out.begin() + kRankedTop, out.end(), ranks_before);
      out.resize(kRankedTop);
    } else {
      std::sort(out.begin(), out.end(), ranks_before);
    }
    if (ranked.size() >= kRankedCacheLimit) ranked.clear();
    Ranking& slot = ranked[state];
    slot.clock = clock;
    slot.truncated = truncated;
    slot.top = std::move(out);
    return slot;
  }

  // A ranked list whose prefix holds every live continuation that ``passes`` (a test that only gets
  // harder as the count falls): the cached top when its last child fails, else the full ranking.
  template <typename Passes>
  const std::vector<Child>& ranked_prefix(int32_t state, Passes passes) {
    const Ranking& ranking = top_ranking(state);
    if (!ranking.truncated) return ranking.top;
    const Child& last_kept = ranking.top.back();
    if (!passes(last_kept) && last_kept.count != count(state)) return ranking.top;
    full_ranking(state, full_scratch);
    return full_scratch;
  }
};

struct DraftOut {
  std::vector<int32_t> tokens, parents;
  std::vector<double> probs;
  std::vector<int64_t> keys;
  double score = 0.0;
  int64_t match_len = 0;
};

// SuffixAutomaton.draft_chain: false when the path cannot beat to_beat (beyond a tie).
bool draft_chain(Automaton& a, int32_t state, int64_t budget, double min_prob, double to_beat, DraftOut& out) {
  out.tokens.clear();
  out.parents.clear();
  out.probs.clear();
  double prob = 1.0, score = 0.0;
  int32_t total = a.count(state);
  for (int64_t drafted = 0; drafted < budget; ++drafted) {
    int32_t token = a.edge_token(state), next, c;
    if (token >= 0) {
      next = a.edge_target(state);
      c = a.count(next);
      if (c == 0) break;
    } else if (token == kBranches) {
      const auto& ranked = a.top_ranking(state).top;  // its first is the best of all
      if (ranked.empty()) break;
      c = ranked[0].count;
      token = ranked[0].token;
      next = ranked[0].state;
    } else {
      break;
    }
    if (c != total) {
      prob = prob * static_cast<double>(c) / static_cast<double>(total);
      if (prob < min_prob) break;
      if (score + prob * static_cast<double>(budget - drafted) <= to_beat) return false;
    }
    out.parents.push_back(static_cast<int32_t>(out.tokens.size()) - 1);
    out.tokens.push_back(token);
    out.probs.push_back(prob);
    score += prob;
    state = next;
    total = c;
  }
  if (score <= to_beat + kTieTolerance) return false;
  out.score = score;
  return true;
}

struct TreeItem {
  double neg_prob;
  int64_t neg_push;
  int32_t token, state, parent;
};

// std heap functions build a max-heap: "less" means "pops later", so the smallest tuple pops first.
bool tree_pops_later(const TreeItem& a, const TreeItem& b) {
  if (a.neg_prob != b.neg_prob) return a.neg_prob > b.neg_prob;
  return a.neg_push > b.neg_push;
}

void push_tree_children(Automaton& a, std::vector<TreeItem>& heap, int64_t& pushes, int32_t state, double prob,
                        int32_t parent, double min_prob) {
  int32_t total = a.count(state);
  int32_t token = a.edge_token(state);
  Child single;
  const Child* begin;
  const Child* end;
  if (token >= 0) {
    int32_t target = a.edge_target(state);
    if (a.count(target) == 0) return;
    single = {a.count(target), 0, token, target};
    begin = &single;
    end = begin + 1;
  } else if (token == kBranches) {
    auto passes = [&](const Child& child) {
      return (child.count == total ? prob : prob * static_cast<double>(child.count) / static_cast<double>(total)) >=
             min_prob;
    };
    const auto& ranked = a.ranked_prefix(state, passes);  // the rest would not be pushed
    begin = ranked.data();
    end = begin + ranked.size();
  } else {
    return;
  }
  for (const Child* it = end; it != begin;) {  // least likely first: among equals the last pushed pops first
    --it;
    double child_prob = it->count == total ? prob
                                           : prob * static_cast<double>(it->count) / static_cast<double>(total);
    if (child_prob >= min_prob) {
      heap.push_back({-child_prob, -(pushes++), it->token, it->state, parent});
      std::push_heap(heap.begin(), heap.end(), tree_pops_later);
    }
  }
}

// SuffixAutomaton.draft_tree.
bool draft_tree(Automaton& a, int32_t state, int64_t budget, double min_prob, double to_beat, DraftOut& out) {
  out.tokens.clear();
  out.parents.clear();
  out.probs.clear();
  double score = 0.0, prob = 1.0;
  int32_t parent = -1;
  std::vector<TreeItem> heap;
  int64_t pushes = 0;
  auto size = [&]() { return static_cast<int64_t>(out.tokens.size()); };
  while (true) {
    while (size() < budget) {
      int32_t token = a.edge_token(state);
      if (token < 0) break;
      int32_t next = a.edge_target(state);
      if (a.count(next) != a.count(state)) break;
      out.parents.push_back(parent);
      out.tokens.push_back(token);
      out.probs.push_back(prob);
      score += prob;
      parent = static_cast<int32_t>(size()) - 1;
      state = next;
    }
    if (size() == budget) break;
    push_tree_children(a, heap, pushes, state, prob, parent, min_prob);
    if (heap.empty()) break;
    const TreeItem top = heap.front();
    prob = -top.neg_prob;
    if (score + prob * static_cast<double>(budget - size()) <= to_beat) return false;
    std::pop_heap(heap.begin(), heap.end(), tree_pops_later);
    heap.pop_back();
    state = top.state;
    out.parents.push_back(top.parent);
    out.tokens.push_back(top.token);
    out.probs.push_back(prob);
    score += prob;
    parent = static_cast<int32_t>(size()) - 1;
  }
  if (score <= to_beat + kTieTolerance) return false;
  out.score = score;
  return true;
}

// ---- calibration stats: the Python dict {group: [accepted, tested]} of NodeCalibration ----

// The group's [accepted, tested] (1), or 0 when absent; -1 on a Python error, or (ValueError) on values no
// estimate can use: not finite, or tested + prior <= 0. A dict subclass is read through its own get(), as
// the reference does.
int lookup_stats(PyObject* stats, double prior, int64_t key, double& accepted, double& tested) {
  PyObject* py_key = PyLong_FromLongLong(key);
  if (py_key == nullptr) return -1;
  PyObject* seen;
  if (PyDict_CheckExact(stats)) {
    seen = PyDict_GetItemWithError(stats, py_key);  // borrowed
    Py_XINCREF(seen);
  } else {
    seen = PyObject_CallMethod(stats, "get", "O", py_key);
    if (seen == Py_None) Py_CLEAR(seen);
  }
  Py_DECREF(py_key);
  if (seen == nullptr) return PyErr_Occurred() ? -1 : 0;
  PyObject* a = PySequence_GetItem(seen, 0);
  if (a == nullptr) {
    Py_DECREF(seen);
    return -1;
  }
  accepted = PyFloat_AsDouble(a);
  Py_DECREF(a);
  if (accepted == -1.0 && PyErr_Occurred()) {
    Py_DECREF(seen);
    return -1;
  }
  PyObject* t = PySequence_GetItem(seen, 1);
  Py_DECREF(seen);
  if (t == nullptr) return -1;
  tested = PyFloat_AsDouble(t);
  Py_DECREF(t);
  if (PyErr_Occurred()) return -1;
  if (!std::isfinite(accepted) || !std::isfinite(tested) || !(tested + prior > 0.0)) {
    char message[200];
    std::snprintf(message, sizeof(message), "stats[%lld] must be finite [accepted, tested] with tested + prior > 0, "
                  "got [%g, %g] with prior %g", static_cast<long long>(key), accepted, tested, prior);
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
  }
  return 1;
}

struct Candidate {
  Automaton* automaton;
  int32_t state;
  int64_t source, matched;
};

struct MergedItem {
  double neg_value;
  int64_t neg_push;
  int32_t parent, token, candidate, state;
  int64_t depth, key;
  double prob;
};

bool merged_pops_later(const MergedItem& a, const MergedItem& b) {
  if (a.neg_value != b.neg_value) return a.neg_value > b.neg_value;
  return a.neg_push > b.neg_push;
}

struct MergedBuilder {
  const std::vector<Candidate>& candidates;
  PyObject* stats;
  double prior, min_prob;
  int64_t budget;
  std::vector<MergedItem> heap;
  int64_t pushes = 0;

  void push(MergedItem item) {
    heap.push_back(item);
    std::push_heap(heap.begin(), heap.end(), merged_pops_later);
  }

  MergedItem pop() {
    std::pop_heap(heap.begin(), heap.end(), merged_pops_later);
    MergedItem item = heap.back();
    heap.pop_back();
    return item;
  }

  // draft_merged's push_children; false on a Python error.
  bool push_children(int32_t candidate, int32_t state, double value, double prob, int32_t parent, int64_t depth) {
    const Candidate& cand = candidates[candidate];
    Automaton& a = *cand.automaton;
    int32_t total = a.count(state);
    int64_t prefix = ((cand.source << 5 | bit_length(cand.matched + depth)) << 5 | bit_length(total)) << 3;
    const auto& ranked = a.ranked_prefix(state, [&](const Child& child) {
      return prob * static_cast<double>(child.count) / static_cast<double>(total) >= min_prob;
    });
    size_t kept = 0;
    for (const Child& child : ranked) {
      double child_prob = prob * static_cast<double>(child.count) / static_cast<double>(total);
      if (child_prob < min_prob) break;
      ++kept;
    }
    for (size_t i = kept; i-- > 0;) {  // the best is pushed last, to pop first among equals
      const Child& child = ranked[i];
      double child_prob = prob * static_cast<double>(child.count) / static_cast<double>(total);
      double ratio = static_cast<double>(child.count) / static_cast<double>(total);
      int64_t key = prefix | ratio_bin(ratio);
      double accepted = 0.0, tested = 0.0, estimate;
      int found = lookup_stats(stats, prior, key, accepted, tested);
      if (found < 0) return false;
      estimate = found ? (accepted + prior * ratio) / (tested + prior) : ratio;
      double child_value = estimate < 1.0 ? value * estimate : value;
      push({-child_value, -(pushes++), parent, child.token, candidate, child.state, depth + 1, key, child_prob});
    }
    return true;
  }

  // draft_merged's main loop; false on a Python error.
  bool build(DraftOut& out) {
    // The reference's (parent node, token) -> node dict, as sibling lists (one entry per node). The budget
    // only bounds the draft: what is reserved is a draft's usual size, not the budget, which may be huge.
    std::vector<int32_t> first_child, next_sibling;
    int32_t first_root_child = -1;
    auto find_node = [&](int32_t parent, int32_t token) {
      int32_t node = parent < 0 ? first_root_child : first_child[static_cast<size_t>(parent)];
      while (node >= 0 && out.tokens[static_cast<size_t>(node)] != token) node = next_sibling[static_cast<size_t>(node)];
      return node;
    };
    const auto expected = static_cast<size_t>(std::min<int64_t>(budget, 1024));
    for (auto* nodes : {&first_child, &next_sibling, &out.tokens, &out.parents}) nodes->reserve(expected);
    out.probs.reserve(expected);
    out.keys.reserve(expected);
    heap.reserve(256);
    for (size_t i = 0; i < candidates.size(); ++i) {
      if (!push_children(static_cast<int32_t>(i), candidates[i].state, 1.0, 1.0, -1, 0)) return false;
    }
    bool have_item = !heap.empty();
    MergedItem item{};
    if (have_item) item = pop();
    while (have_item) {
      have_item = false;
      int32_t parent = item.parent, token = item.token, state = item.state;
      int64_t depth = item.depth, key = item.key;
      double prob = item.prob, value = -item.neg_value;
      const int32_t candidate = item.candidate;
      double top = heap.empty() ? -1.0 : -heap.front().neg_value;
      const Candidate& cand = candidates[candidate];
      Automaton& a = *cand.automaton;
      const int64_t source_bits = cand.source << 5, matched = cand.matched;
      int64_t span_total = -1, span_limit = 0, span_key = 0;
      double span_estimate = 1.0;
      int32_t node = find_node(parent, token);
      while (true) {
        bool fresh = node < 0;
        if (fresh) {
          node = static_cast<int32_t>(out.tokens.size());
          next_sibling.push_back(parent < 0 ? first_root_child : first_child[static_cast<size_t>(parent)]);
          first_child.push_back(-1);
          (parent < 0 ? first_root_child : first_child[static_cast<size_t>(parent)]) = node;
          out.tokens.push_back(token);
          out.parents.push_back(parent);
          out.probs.push_back(value);
          out.keys.push_back(key);
          if (node + 1 == budget) break;
        }
        token = a.edge_token(state);
        if (token < 0) {
          if (token == kBranches && !push_children(candidate, state, value, prob, node, depth)) return false;
          break;
        }
        int32_t next = a.edge_target(state);
        int32_t total = a.count(state), c = a.count(next);
        double estimate;
        if (c == total) {
          int64_t at_length = matched + depth;
          if (total != span_total || at_length >= span_limit) {
            span_total = total;
            span_limit = int64_t(1) << bit_length(at_length);
            span_key = ((source_bits | bit_length(at_length)) << 5 | bit_length(total)) << 3 | 4;
            double accepted = 0.0, tested = 0.0;
            int found = lookup_stats(stats, prior, span_key, accepted, tested);
            if (found < 0) return false;
            span_estimate = found ? (accepted + prior) / (tested + prior) : 1.0;
          }
          key = span_key;
          estimate = span_estimate;
        } else {
          if (c == 0) break;
          prob = prob * static_cast<double>(c) / static_cast<double>(total);
          if (prob < min_prob) break;
          double ratio = static_cast<double>(c) / static_cast<double>(total);
          key = ((source_bits | bit_length(matched + depth)) << 5 | bit_length(total)) << 3;
          key |= ratio_bin(ratio);
          double accepted = 0.0, tested = 0.0;
          int found = lookup_stats(stats, prior, key, accepted, tested);
          if (found < 0) return false;
          estimate = found ? (accepted + prior * ratio) / (tested + prior) : ratio;
        }
        double child_value = estimate < 1.0 ? value * estimate : value;
        depth += 1;
        if (child_value < top) {  // push it and pop the top in one heap operation
          push({-child_value, -(pushes++), node, token, candidate, next, depth, key, prob});
          item = pop();
          have_item = true;
          break;
        }
        parent = node;
        state = next;
        value = child_value;
        node = fresh ? -1 : find_node(parent, token);  // a new node has no children yet
      }
      if (static_cast<int64_t>(out.tokens.size()) == budget) break;
      if (!have_item && !heap.empty()) {
        item = pop();
        have_item = true;
      }
    }
    return true;
  }
};

// ---- Python glue: every argument is checked here, before the core sees it ----

struct AutomatonObject {
  PyObject_HEAD
  Automaton* core;
};

extern PyTypeObject AutomatonType;

// A reference released on every way out of a scope, C++ exceptions included.
struct Owned {
  PyObject* object;
  explicit Owned(PyObject* obj) : object(obj) {}
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { Py_XDECREF(object); }
};

// TypeError naming the argument, unless the conversion failed otherwise (an exception of its own).
void type_error(PyObject* obj, const char* name, const char* expected) {
  if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_TypeError)) return;
  PyErr_Clear();
  PyErr_Format(PyExc_TypeError, "%s must be %s, got %.100s", name, expected, Py_TYPE(obj)->tp_name);
}

// An int argument in [lo, hi] (any object with __index__).
bool int_arg(PyObject* obj, const char* name, long long lo, long long hi, long long& out) {
  PyObject* index = PyNumber_Index(obj);
  if (index == nullptr) {
    type_error(obj, name, "an int");
    return false;
  }
  int overflow = 0;
  long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
  if (value == -1 && PyErr_Occurred()) {
    Py_DECREF(index);
    return false;
  }
  if (overflow != 0 || value < lo || value > hi) {
    PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %R", name, lo, hi, index);
    Py_DECREF(index);
    return false;
  }
  Py_DECREF(index);
  out = value;
  return true;
}

// A finite float argument in [lo, hi] (any real number).
bool float_arg(PyObject* obj, const char* name, double lo, double hi, double& out) {
  double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) {
    type_error(obj, name, "a float");
    return false;
  }
  if (!std::isfinite(value) || value < lo || value > hi) {
    char message[160];
    std::snprintf(message, sizeof(message), "%s must be a finite float in [%g, %g], got %g", name, lo, hi, value);
    PyErr_SetString(PyExc_ValueError, message);
    return false;
  }
  out = value;
  return true;
}

// Token ids in [0, 2**31) from any iterable of ints. The iterable is copied into a tuple first: converting
// an item may run Python code (__index__) that changes the caller's list.
bool read_tokens(PyObject* obj, const char* name, std::vector<int32_t>& out) {
  Owned snapshot(PySequence_Tuple(obj));
  PyObject* items = snapshot.object;
  if (items == nullptr) {
    type_error(obj, name, "an iterable of token ids");
    return false;
  }
  Py_ssize_t n = PyTuple_GET_SIZE(items);
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(items, i);
    PyObject* index = PyLong_CheckExact(item) ? (Py_INCREF(item), item) : PyNumber_Index(item);
    if (index == nullptr) {
      if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int token id, got %.100s", name, i, Py_TYPE(item)->tp_name);
      }
      return false;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (overflow != 0 || value < 0 || value > INT32_MAX) {
      PyErr_Format(PyExc_ValueError, "%s[%zd]: token ids must be in [0, 2**31), got %R", name, i, index);
      value = -1;
    }
    Py_DECREF(index);
    if (value == -1) return false;  // -1 is out of range too: the error is set
    out[static_cast<size_t>(i)] = static_cast<int32_t>(value);
  }
  return true;
}

// The automaton of a Python object, or nullptr with TypeError, or RuntimeError when it cannot be used
// now: broken by an earlier error, or (for a mutation or a draft) in use by a draft in progress.
Automaton* automaton_of(PyObject* obj, const char* name, bool exclusive) {
  if (!PyObject_TypeCheck(obj, &AutomatonType)) {
    PyErr_Format(PyExc_TypeError, "%s must be a _suffix_core.SuffixAutomaton, got %.100s", name, Py_TYPE(obj)->tp_name);
    return nullptr;
  }
  Automaton* a = reinterpret_cast<AutomatonObject*>(obj)->core;
  if (a->broken) {
    PyErr_SetString(PyExc_RuntimeError, "this suffix automaton was left incomplete by an earlier error "
                                        "(out of memory while appending): build a new one");
    return nullptr;
  }
  if (exclusive && a->busy > 0) {
    PyErr_SetString(PyExc_RuntimeError, "this suffix automaton is being read by a draft in progress "
                                        "(a calibration statistics lookup called back into it)");
    return nullptr;
  }
  return a;
}

// A state of ``a``, converted (int_arg with no bounds) before ``a`` is checked: a conversion may run Python code.
bool check_state(const Automaton& a, long long state, const char* name, int32_t& out) {
  if (state < 0 || state >= static_cast<long long>(a.states.size())) {
    PyErr_Format(PyExc_IndexError, "%s %lld out of range (%zu states)", name, state, a.states.size());
    return false;
  }
  out = static_cast<int32_t>(state);
  return true;
}

// A state a draft starts from: counts are divided by its count, so it must have occurred (a match never
// lands on a state whose count removals emptied).
bool draft_state_ok(const Automaton& a, int32_t state, const char* name) {
  if (a.count(state) > 0) return true;
  PyErr_Format(PyExc_ValueError, "%s: state %d has continuations but no occurrences (count %d): it is no match "
                                 "of this automaton", name, state, a.count(state));
  return false;
}

PyObject* int_list(const std::vector<int32_t>& values) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* item = PyLong_FromLong(values[i]);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// Every C++ exception becomes a Python exception: running out of memory (or a size past what a vector
// holds) MemoryError, anything else RuntimeError. An exception may never reach the interpreter.
PyObject* python_error_from_cpp() {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  } catch (const std::length_error& err) {
    PyErr_Format(PyExc_MemoryError, "suffix core: %s", err.what());
  } catch (const std::exception& err) {
    PyErr_Format(PyExc_RuntimeError, "suffix core: %s", err.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "suffix core: unknown C++ exception");
  }
  return nullptr;
}

template <PyObject* (*F)(PyObject*, PyObject*)>
PyObject* guarded(PyObject* self, PyObject* args) {
  try {
    return F(self, args);
  } catch (...) {
    return python_error_from_cpp();
  }
}

template <PyObject* (*F)(PyObject*, void*)>
PyObject* guarded_get(PyObject* self, void* closure) {
  try {
    return F(self, closure);
  } catch (...) {
    return python_error_from_cpp();
  }
}

PyObject* automaton_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"count_depth", nullptr};
  PyObject* depth_obj;
  long long depth;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", const_cast<char**>(keywords), &depth_obj)) return nullptr;
  if (!int_arg(depth_obj, "count_depth", 2, LLONG_MAX, depth)) return nullptr;
  auto* self = reinterpret_cast<AutomatonObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  try {
    self->core = new Automaton(depth);
  } catch (...) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return reinterpret_cast<PyObject*>(self);
}

void automaton_dealloc(PyObject* obj) {
  delete reinterpret_cast<AutomatonObject*>(obj)->core;
  Py_TYPE(obj)->tp_free(obj);
}

PyObject* automaton_extend(PyObject* self, PyObject* tokens) {
  std::vector<int32_t> values;
  if (!read_tokens(tokens, "tokens", values)) return nullptr;
  Automaton* a = automaton_of(self, "self", true);
  if (a == nullptr) return nullptr;
  try {
    a->extend(values);
  } catch (...) {
    a->broken = true;
    throw;
  }
  Py_RETURN_NONE;
}

PyObject* automaton_end_sequence(PyObject* self, PyObject*) {
  Automaton* a = automaton_of(self, "self", true);
  if (a == nullptr) return nullptr;
  a->end_sequence();
  Py_RETURN_NONE;
}

PyObject* automaton_remove(PyObject* self, PyObject* tokens) {
  std::vector<int32_t> values;
  if (!read_tokens(tokens, "tokens", values)) return nullptr;
  Automaton* a = automaton_of(self, "self", true);
  if (a == nullptr) return nullptr;
  int64_t refused = a->remove(values);
  if (refused >= 0) {
    PyErr_Format(PyExc_ValueError, "remove: tokens[%lld] does not continue the tokens before it in this "
                                   "automaton: the sequence was never added", static_cast<long long>(refused));
    return nullptr;
  }
  if (refused < -1) {
    PyErr_Format(PyExc_ValueError, "remove: the count of state %lld would fall below zero: the sequence was not "
                                   "added (or was already removed)", static_cast<long long>(-2 - refused));
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* automaton_count_of(PyObject* self, PyObject* pattern) {
  std::vector<int32_t> values;
  if (!read_tokens(pattern, "pattern", values)) return nullptr;
  Automaton* a = automaton_of(self, "self", false);
  if (a == nullptr) return nullptr;
  if (values.empty()) {
    PyErr_SetString(PyExc_ValueError, "count_of needs a non-empty pattern");
    return nullptr;
  }
  return PyLong_FromLongLong(a->count_of(values));
}

PyObject* automaton_advance(PyObject* self, PyObject* args) {
  PyObject *state_obj, *matched_obj, *tokens, *max_len_obj;
  if (!PyArg_UnpackTuple(args, "advance", 4, 4, &state_obj, &matched_obj, &tokens, &max_len_obj)) return nullptr;
  std::vector<int32_t> values;
  long long state, matched, max_len;
  if (!int_arg(state_obj, "state", LLONG_MIN, LLONG_MAX, state) || !read_tokens(tokens, "tokens", values) ||
      !int_arg(matched_obj, "matched", 0, INT32_MAX, matched) || !int_arg(max_len_obj, "max_len", 1, LLONG_MAX, max_len)) {
    return nullptr;
  }
  Automaton* a = automaton_of(self, "self", false);
  int32_t s;
  if (a == nullptr || !check_state(*a, state, "state", s)) return nullptr;
  int64_t m = matched;
  a->advance(s, m, values.data(), values.size(), max_len);
  return Py_BuildValue("(iL)", s, static_cast<long long>(m));
}

PyObject* automaton_match(PyObject* self, PyObject* args) {
  PyObject *context, *max_len_obj;
  if (!PyArg_UnpackTuple(args, "match", 2, 2, &context, &max_len_obj)) return nullptr;
  std::vector<int32_t> values;
  long long max_len;
  if (!read_tokens(context, "context", values) || !int_arg(max_len_obj, "max_len", 1, LLONG_MAX, max_len)) {
    return nullptr;
  }
  Automaton* a = automaton_of(self, "self", false);
  if (a == nullptr) return nullptr;
  size_t start = 0;  // context[-max_len:]
  if (static_cast<unsigned long long>(max_len) < values.size()) start = values.size() - static_cast<size_t>(max_len);
  int32_t s = kRoot;
  int64_t m = 0;
  a->advance(s, m, values.data() + start, values.size() - start, max_len);
  return Py_BuildValue("(iL)", s, static_cast<long long>(m));
}

PyObject* automaton_suffix_of_length(PyObject* self, PyObject* args) {
  PyObject *state_obj, *max_len_obj;
  if (!PyArg_UnpackTuple(args, "suffix_of_length", 2, 2, &state_obj, &max_len_obj)) return nullptr;
  long long state, max_len;
  if (!int_arg(state_obj, "state", LLONG_MIN, LLONG_MAX, state) ||
      !int_arg(max_len_obj, "max_len", 0, LLONG_MAX, max_len)) {
    return nullptr;
  }
  Automaton* a = automaton_of(self, "self", false);
  int32_t s;
  if (a == nullptr || !check_state(*a, state, "state", s)) return nullptr;
  return PyLong_FromLong(a->suffix_of_length(s, max_len));
}

PyObject* automaton_tail_state(PyObject* self, PyObject* arg) {
  long long max_len;
  if (!int_arg(arg, "max_len", 0, LLONG_MAX, max_len)) return nullptr;
  Automaton* a = automaton_of(self, "self", false);
  if (a == nullptr) return nullptr;
  return Py_BuildValue("(iL)", a->suffix_of_length(a->window, max_len),
                       static_cast<long long>(std::min<int64_t>(a->written, max_len)));
}

PyObject* automaton_ranked_children(PyObject* self, PyObject* arg) {
  long long index;
  if (!int_arg(arg, "state", LLONG_MIN, LLONG_MAX, index)) return nullptr;
  Automaton* a = automaton_of(self, "self", false);
  int32_t state;
  if (a == nullptr || !check_state(*a, index, "state", state)) return nullptr;
  std::vector<Child> ranked;
  a->full_ranking(state, ranked);
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ranked.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < ranked.size(); ++i) {
    PyObject* item = Py_BuildValue("(iLii)", ranked[i].count, static_cast<long long>(ranked[i].stamp),
                                   ranked[i].token, ranked[i].state);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* automaton_children(PyObject* self, PyObject* arg) {
  long long index;
  if (!int_arg(arg, "state", LLONG_MIN, LLONG_MAX, index)) return nullptr;
  Automaton* a = automaton_of(self, "self", false);
  int32_t state;
  if (a == nullptr || !check_state(*a, index, "state", state)) return nullptr;
  std::vector<std::pair<int32_t, int32_t>> out;
  int32_t edge = a->edge_token(state);
  if (edge >= 0) out.emplace_back(edge, a->edge_target(state));
  if (edge == kBranches) out.assign(a->branch_maps[a->edge_target(state)].begin(), a->branch_maps[a->edge_target(state)].end());
  std::sort(out.begin(), out.end());
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(out.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < out.size(); ++i) {
    PyObject* item = Py_BuildValue("(ii)", out[i].first, out[i].second);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// Snapshot copies of the per-state arrays, for tests and inspection (the reference exposes its arrays).
PyObject* field_list(PyObject* self, int32_t Automaton::State::*field) {
  std::vector<int32_t> values;
  for (const auto& state : reinterpret_cast<AutomatonObject*>(self)->core->states) values.push_back(state.*field);
  return int_list(values);
}
PyObject* automaton_length(PyObject* self, void*) { return field_list(self, &Automaton::State::length); }
PyObject* automaton_link(PyObject* self, void*) { return field_list(self, &Automaton::State::link); }
PyObject* automaton_count(PyObject* self, void*) { return field_list(self, &Automaton::State::count); }

PyObject* automaton_memory_bytes(PyObject* self, void*) {
  return PyLong_FromSize_t(reinterpret_cast<AutomatonObject*>(self)->core->memory_bytes());
}

PyObject* automaton_num_states(PyObject* self, void*) {
  return PyLong_FromSize_t(reinterpret_cast<AutomatonObject*>(self)->core->states.size());
}

PyObject* automaton_clock(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<AutomatonObject*>(self)->core->clock);
}

PyObject* automaton_count_depth(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<AutomatonObject*>(self)->core->count_depth);
}

PyMethodDef automaton_methods[] = {
    {"extend", guarded<automaton_extend>, METH_O, "Append tokens to the current sequence."},
    {"end_sequence", guarded<automaton_end_sequence>, METH_NOARGS, "Start a new sequence."},
    {"remove", guarded<automaton_remove>, METH_O,
     "Subtract one previously added sequence from the counts (ValueError, changing nothing, if it was not added)."},
    {"count_of", guarded<automaton_count_of>, METH_O, "Occurrences of a non-empty pattern."},
    {"advance", guarded<automaton_advance>, METH_VARARGS, "advance(state, matched, tokens, max_len) -> (state, matched)."},
    {"match", guarded<automaton_match>, METH_VARARGS, "match(context, max_len) -> (state, matched)."},
    {"suffix_of_length", guarded<automaton_suffix_of_length>, METH_VARARGS, "The state holding the suffix of max_len tokens."},
    {"tail_state", guarded<automaton_tail_state>, METH_O, "State and length of the current sequence's suffix."},
    {"ranked_children", guarded<automaton_ranked_children>, METH_O, "Live continuations as (count, stamp, token, state)."},
    {"children", guarded<automaton_children>, METH_O, "(token, state) for every transition, dead ones included, by token."},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef automaton_getset[] = {
    {"num_states", guarded_get<automaton_num_states>, nullptr, "number of states", nullptr},
    {"memory_bytes", guarded_get<automaton_memory_bytes>, nullptr, "heap bytes held (outside Python's allocator)", nullptr},
    {"clock", guarded_get<automaton_clock>, nullptr, "occurrences appended so far", nullptr},
    {"count_depth", guarded_get<automaton_count_depth>, nullptr, "longest pattern whose count is exact", nullptr},
    {"length", guarded_get<automaton_length>, nullptr, "a copy of each state's longest length", nullptr},
    {"link", guarded_get<automaton_link>, nullptr, "a copy of each state's suffix link", nullptr},
    {"count", guarded_get<automaton_count>, nullptr, "a copy of each state's occurrence count", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject AutomatonType = {PyVarObject_HEAD_INIT(nullptr, 0)};

template <typename T>
PyObject* packed(const std::vector<T>& values) {
  return PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(values.data()),
                                       static_cast<Py_ssize_t>(values.size() * sizeof(T)));
}

// A draft as native-endian bytearrays that numpy wraps without a copy (np.frombuffer), instead of lists it
// would convert element by element: (tokens int32, parents int32, probs float64, probs float32 (rounded as
// numpy rounds), extra, more). Steals the references to extra and more.
PyObject* packed_draft(const DraftOut& out, PyObject* extra, PyObject* more) {
  const std::vector<float> probs32(out.probs.begin(), out.probs.end());
  PyObject* items[6] = {packed(out.tokens), packed(out.parents), packed(out.probs), packed(probs32), extra, more};
  PyObject* result = PyTuple_New(6);
  bool ok = result != nullptr;
  for (PyObject* item : items) ok = ok && item != nullptr;
  if (!ok) {
    for (PyObject* item : items) Py_XDECREF(item);
    Py_XDECREF(result);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < 6; ++i) PyTuple_SET_ITEM(result, i, items[i]);
  return result;
}

// SpecParams.budget: max(0, min(int(matched * factor + offset + 1e-6), max_spec_tokens, limit)), exactly,
// for any finite factor and offset: the float is compared with the cap before it is converted (a float
// past the int64 range has no defined conversion).
int64_t spec_budget(int64_t matched, double factor, double offset, int64_t max_spec_tokens, int64_t limit) {
  const int64_t cap = std::min(max_spec_tokens, limit);
  const double allowed = static_cast<double>(matched) * factor + offset + 1e-6;
  if (cap <= 0 || allowed < 1.0) return 0;
  if (!(allowed < 0x1p63)) return cap;  // beyond every int64 (or infinite)
  return std::min(static_cast<int64_t>(allowed), cap);  // exact: 1 <= allowed < 2**63
}

// best_draft(automaton, state, matched, limit, max_spec_tokens, factor, offset, min_prob, tree, to_beat)
//   -> None or packed (tokens, parents, probs, probs32, score, match_len): SuffixIndex._best_draft for one index.
PyObject* core_best_draft(PyObject*, PyObject* args) {
  PyObject *obj, *state_obj, *matched_obj, *limit_obj, *max_spec_obj, *factor_obj, *offset_obj, *min_prob_obj,
      *tree_obj, *to_beat_obj;
  if (!PyArg_UnpackTuple(args, "best_draft", 10, 10, &obj, &state_obj, &matched_obj, &limit_obj, &max_spec_obj,
                         &factor_obj, &offset_obj, &min_prob_obj, &tree_obj, &to_beat_obj)) {
    return nullptr;
  }
  long long state, matched, limit, max_spec_tokens;
  double factor, offset, min_prob, to_beat;
  int tree;
  if (!int_arg(state_obj, "state", LLONG_MIN, LLONG_MAX, state) ||
      !int_arg(matched_obj, "matched", 0, INT32_MAX, matched) || !int_arg(limit_obj, "limit", 0, LLONG_MAX, limit) ||
      !int_arg(max_spec_obj, "max_spec_tokens", 0, LLONG_MAX, max_spec_tokens) ||
      !float_arg(factor_obj, "factor", 0.0, DBL_MAX, factor) ||
      !float_arg(offset_obj, "offset", -DBL_MAX, DBL_MAX, offset) ||
      !float_arg(min_prob_obj, "min_prob", 0.0, 1.0, min_prob) ||
      !float_arg(to_beat_obj, "to_beat", -DBL_MAX, DBL_MAX, to_beat) || (tree = PyObject_IsTrue(tree_obj)) < 0) {
    return nullptr;
  }
  Automaton* a = automaton_of(obj, "automaton", true);  // after the conversions: they may run Python code
  int32_t s;
  if (a == nullptr || !check_state(*a, state, "state", s)) return nullptr;
  DraftOut out, best;
  bool have_best = false;
  int64_t m = matched;
  while (s > kRoot) {
    int64_t budget = spec_budget(m, factor, offset, max_spec_tokens, limit);
    if (static_cast<double>(budget) <= to_beat + kTieTolerance) break;
    if (a->edge_token(s) != kNoEdge) {
      if (!draft_state_ok(*a, s, "best_draft")) return nullptr;
      bool found = tree ? draft_tree(*a, s, budget, min_prob, to_beat, out)
                        : draft_chain(*a, s, budget, min_prob, to_beat, out);
      if (found) {
        out.match_len = m;
        std::swap(best, out);
        have_best = true;
        to_beat = best.score;
      }
    }
    s = a->link(s);
    m = a->length(s);
  }
  if (!have_best) Py_RETURN_NONE;
  return packed_draft(best, PyFloat_FromDouble(best.score), PyLong_FromLongLong(best.match_len));
}

// The automata of a draft in progress: referenced (so no Python code frees them) and marked busy (so none
// mutates them) until the draft is done.
struct HeldAutomata {
  std::vector<PyObject*> objects;
  void hold(PyObject* obj) {
    objects.push_back(obj);  // first: if it throws, nothing is held
    Py_INCREF(obj);
    reinterpret_cast<AutomatonObject*>(obj)->core->busy += 1;
  }
  ~HeldAutomata() {
    for (PyObject* obj : objects) {
      reinterpret_cast<AutomatonObject*>(obj)->core->busy -= 1;
      Py_DECREF(obj);
    }
  }
};

// budgeted_draft(sources, stats, prior, budget, min_prob)
//   -> packed (tokens, parents, probs, probs32, keys int64, score):
// the candidate walk of SuffixIndex._budgeted_draft (every state on each source's suffix path with a live
// continuation) and draft_merged over them. sources: (source, automaton, state, matched) tuples.
PyObject* core_budgeted_draft(PyObject*, PyObject* args) {
  PyObject *sources_obj, *stats, *prior_obj, *budget_obj, *min_prob_obj;
  if (!PyArg_UnpackTuple(args, "budgeted_draft", 5, 5, &sources_obj, &stats, &prior_obj, &budget_obj,
                         &min_prob_obj)) {
    return nullptr;
  }
  double prior, min_prob;
  long long budget;
  if (!PyDict_Check(stats)) {
    type_error(stats, "stats", "a dict");
    return nullptr;
  }
  if (!float_arg(prior_obj, "prior", 0.0, DBL_MAX, prior) || !int_arg(budget_obj, "budget", 0, LLONG_MAX, budget) ||
      !float_arg(min_prob_obj, "min_prob", 0.0, 1.0, min_prob)) {
    return nullptr;
  }
  Owned snapshot(PySequence_Tuple(sources_obj));  // the caller's list may change while Python code runs
  PyObject* sources = snapshot.object;
  if (sources == nullptr) {
    type_error(sources_obj, "sources", "a sequence of (source, automaton, state, matched) tuples");
    return nullptr;
  }
  struct Source {
    long long source, state, matched;
    PyObject* automaton;  // held by the snapshot
    int32_t start;
  };
  std::vector<Source> parsed;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sources); ++i) {  // the conversions, which may run Python code
    PyObject* item = PyTuple_GET_ITEM(sources, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
      PyErr_Format(PyExc_TypeError, "sources[%zd] must be a (source, automaton, state, matched) tuple, got %.100s",
                   i, Py_TYPE(item)->tp_name);
      return nullptr;
    }
    Source parsed_item{0, 0, 0, PyTuple_GET_ITEM(item, 1), 0};
    if (!int_arg(PyTuple_GET_ITEM(item, 0), "sources[i][0] (the source)", 0, 0xffff, parsed_item.source) ||
        !int_arg(PyTuple_GET_ITEM(item, 2), "sources[i][2] (the state)", LLONG_MIN, LLONG_MAX, parsed_item.state) ||
        !int_arg(PyTuple_GET_ITEM(item, 3), "sources[i][3] (matched)", 0, INT32_MAX, parsed_item.matched)) {
      return nullptr;
    }
    parsed.push_back(parsed_item);
  }
  for (Source& item : parsed) {  // then the checks, with no Python code in between
    Automaton* a = automaton_of(item.automaton, "sources[i][1] (the automaton)", true);
    if (a == nullptr || !check_state(*a, item.state, "sources[i][2] (the state)", item.start)) return nullptr;
  }
  HeldAutomata held;  // declared after the snapshot: released before it
  std::vector<Candidate> candidates;
  for (const Source& item : parsed) {
    held.hold(item.automaton);
    Automaton* a = reinterpret_cast<AutomatonObject*>(item.automaton)->core;
    const int64_t source = item.source;
    int32_t s = item.start;
    int64_t m = item.matched;
    while (s > kRoot) {
      if (a->has_live_child(s)) {
        if (!draft_state_ok(*a, s, "budgeted_draft")) return nullptr;
        candidates.push_back({a, s, source, m});
      }
      s = a->link(s);
      m = a->length(s);
    }
  }
  DraftOut out;
  if (budget > 0) {
    MergedBuilder builder{candidates, stats, prior, min_prob, budget, {}, 0};
    if (!builder.build(out)) return nullptr;
  }
  double score = 0.0;  // summed in node order, as the reference does
  for (double prob : out.probs) score += prob;
  return packed_draft(out, packed(out.keys), PyFloat_FromDouble(score));
}

// A packed array argument (any contiguous buffer, aligned or not) of items of type T.
template <typename T>
bool read_packed(PyObject* obj, const char* name, std::vector<T>& out) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
    type_error(obj, name, "a packed buffer (bytes, bytearray, array)");
    return false;
  }
  bool ok = view.len % static_cast<Py_ssize_t>(sizeof(T)) == 0;
  if (ok) {
    out.resize(static_cast<size_t>(view.len) / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), view.buf, static_cast<size_t>(view.len));
  } else {
    PyErr_Format(PyExc_ValueError, "%s: a packed buffer of %zu-byte items expected, got %zd bytes", name, sizeof(T),
                 view.len);
  }
  PyBuffer_Release(&view);
  return ok;
}

// learn(stats, tokens, parents, keys, accepted_ids): NodeCalibration.learn on a packed draft (as
// budgeted_draft returns it), updating the same dict the same way.
PyObject* core_learn(PyObject*, PyObject* args) {
  PyObject *stats, *tokens_obj, *parents_obj, *keys_obj, *accepted_obj;
  if (!PyArg_UnpackTuple(args, "learn", 5, 5, &stats, &tokens_obj, &parents_obj, &keys_obj, &accepted_obj)) {
    return nullptr;
  }
  if (!PyDict_Check(stats)) {
    type_error(stats, "stats", "a dict");
    return nullptr;
  }
  std::vector<int32_t> tokens, parents, accepted;
  std::vector<int64_t> keys;
  if (!read_packed(tokens_obj, "tokens", tokens) || !read_packed(parents_obj, "parents", parents) ||
      !read_packed(keys_obj, "keys", keys) || !read_tokens(accepted_obj, "accepted_ids", accepted)) {
    return nullptr;
  }
  const size_t n = tokens.size();
  if (parents.size() != n || keys.size() != n) {
    PyErr_Format(PyExc_ValueError, "tokens, parents and keys differ in length (%zu, %zu, %zu)", n, parents.size(),
                 keys.size());
    return nullptr;
  }
  for (size_t node = 0; node < n; ++node) {  // parents precede their children in a draft
    if (parents[node] < -1 || parents[node] >= static_cast<int64_t>(node)) {
      PyErr_Format(PyExc_ValueError, "parents[%zu] = %d: a parent must be -1 (the root) or an earlier node", node,
                   parents[node]);
      return nullptr;
    }
  }
  const auto known = static_cast<int64_t>(accepted.size());
  std::vector<int64_t> next_truth(n, -1);  // accepted node -> index of the token after it
  for (size_t node = 0; node < n; ++node) {
    int32_t parent = parents[node];
    int64_t at = parent < 0 ? 0 : next_truth[static_cast<size_t>(parent)];
    if (at < 0 || at >= known) continue;
    bool hit = tokens[node] == accepted[static_cast<size_t>(at)];
    if (hit) next_truth[node] = at + 1;
    PyObject* key = PyLong_FromLongLong(keys[node]);
    if (key == nullptr) return nullptr;
    PyObject* seen = PyDict_GetItemWithError(stats, key);  // borrowed: held below, Python code may drop it
    Py_XINCREF(seen);
    bool ok;
    if (seen == nullptr) {
      ok = !PyErr_Occurred();
      PyObject* fresh = ok ? Py_BuildValue("[dd]", hit ? 1.0 : 0.0, 1.0) : nullptr;
      ok = fresh != nullptr && PyDict_SetItem(stats, key, fresh) == 0;
      Py_XDECREF(fresh);
    } else {
      double accepted_count = 0.0, tested = 0.0;
      PyObject* a = PySequence_GetItem(seen, 0);
      PyObject* t = PySequence_GetItem(seen, 1);
      ok = a != nullptr && t != nullptr;
      if (ok) {
        accepted_count = PyFloat_AsDouble(a);
        ok = !PyErr_Occurred();
      }
      if (ok) {
        tested = PyFloat_AsDouble(t);
        ok = !PyErr_Occurred();
      }
      Py_XDECREF(a);
      Py_XDECREF(t);
      PyObject* new_a = ok ? PyFloat_FromDouble(accepted_count + (hit ? 1.0 : 0.0)) : nullptr;
      PyObject* new_t = ok ? PyFloat_FromDouble(tested + 1.0) : nullptr;
      ok = new_a != nullptr && new_t != nullptr && PySequence_SetItem(seen, 0, new_a) == 0 &&
           PySequence_SetItem(seen, 1, new_t) == 0;
      Py_XDECREF(new_a);
      Py_XDECREF(new_t);
      Py_DECREF(seen);
    }
    Py_DECREF(key);
    if (!ok) return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"best_draft", guarded<core_best_draft>, METH_VARARGS, "SuffixIndex._best_draft over one automaton."},
    {"budgeted_draft", guarded<core_budgeted_draft>, METH_VARARGS, "The candidate walk and draft_merged of budgeted mode."},
    {"learn", guarded<core_learn>, METH_VARARGS, "NodeCalibration.learn on a packed draft."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_suffix_core",
                          "Compiled core of specjax.drafters.suffix_index (bit-identical to its Python reference).",
                          -1, module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__suffix_core(void) {
  AutomatonType.tp_name = "specjax.drafters._suffix_core.SuffixAutomaton";
  AutomatonType.tp_basicsize = sizeof(AutomatonObject);
  AutomatonType.tp_flags = Py_TPFLAGS_DEFAULT;
  AutomatonType.tp_doc = "Suffix automaton with occurrence counts (compiled; see suffix_reference.SuffixAutomaton).";
  AutomatonType.tp_new = automaton_new;
  AutomatonType.tp_dealloc = automaton_dealloc;
  AutomatonType.tp_methods = automaton_methods;
  AutomatonType.tp_getset = automaton_getset;
  if (PyType_Ready(&AutomatonType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  Py_INCREF(&AutomatonType);
  if (PyModule_AddObject(module, "SuffixAutomaton", reinterpret_cast<PyObject*>(&AutomatonType)) < 0) {
    Py_DECREF(&AutomatonType);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
