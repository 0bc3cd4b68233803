// tinyfuse._loader: batches of token windows from memory-mapped shards, filled ahead of
// time by background threads into a ring of caller-owned buffers. A slot holds either the
// raw tokens, [B][T+1] (for a copy to the GPU, which widens them there), or the int64
// inputs and targets, [2][B][T] (for a consumer on the CPU).
//
// The split's shards form one token stream cut into W non-overlapping windows of T+1
// tokens. Window positions run on forever: position p belongs to epoch p / W and names
// window perm_epoch[p % W] (or p % W unshuffled). Global batch n takes positions
// [n*B*world, (n+1)*B*world); rank r takes its B consecutive ones. A batch therefore
// depends only on its index, which is what makes resume exact and the worker count
// irrelevant to the output.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Fisher-Yates driven by splitmix64; the Python reference loader draws the same sequence.
std::vector<uint64_t> window_permutation(uint64_t windows, uint64_t seed, uint64_t epoch) {
  std::vector<uint64_t> perm(windows);
  std::iota(perm.begin(), perm.end(), 0);
  uint64_t state = seed ^ (epoch * 0xD1B54A32D192ED03ULL);
  for (uint64_t i = windows; i > 1; --i) {
    uint64_t j = splitmix64(state) % i;
    std::swap(perm[i - 1], perm[j]);
  }
  return perm;
}

struct Shard {
  const uint8_t* data = nullptr;
  size_t bytes = 0;
};

class Loader {
 public:
  Loader(const std::vector<std::string>& paths, int token_bytes, int64_t batch_size, int64_t seq_len,
         uint64_t seed, int64_t rank, int64_t world_size, bool shuffle, const std::vector<uintptr_t>& slots,
         bool widen, int workers, uint64_t first_batch)
      : token_bytes_(token_bytes), widen_(widen), batch_size_(batch_size), window_(seq_len + 1), seed_(seed), rank_(rank),
        world_size_(world_size), shuffle_(shuffle), slots_(slots) {
    if (token_bytes != 2 && token_bytes != 4) throw py::value_error("token_bytes must be 2 or 4");
    if (batch_size <= 0 || seq_len <= 0) throw py::value_error("batch_size and seq_len must be positive");
    if (world_size <= 0 || rank < 0 || rank >= world_size)
      throw py::value_error("rank must be in [0, world_size)");
    if (slots.empty()) throw py::value_error("at least one buffer slot is needed");
    if (workers <= 0) throw py::value_error("workers must be positive");
    map_shards(paths);
    windows_ = total_tokens_ / static_cast<uint64_t>(window_);
    if (windows_ == 0) {
      unmap();
      throw py::value_error("the split holds " + std::to_string(total_tokens_) + " tokens, fewer than seq_len + 1 = " +
                            std::to_string(window_));
    }
    workers_ = workers;
    start(first_batch);
  }

  ~Loader() {
    stop();
    unmap();
  }

  // Blocks (without the GIL) until the next batch is in its slot; returns the slot. A close()
  // from another thread wakes it, and it raises instead of waiting for workers that are gone.
  int64_t acquire() {
    py::gil_scoped_release release;  // before the lock: never wait for the GIL while holding it
    std::unique_lock<std::mutex> lock(mutex_);
    if (closed_ || stopping_) throw std::runtime_error("the loader is closed");
    const uint64_t batch = next_;
    const size_t slot = batch % slots_.size();
    ready_cv_.wait(lock, [&] { return ready_[slot] == batch || !error_.empty() || stopping_; });
    if (!error_.empty()) throw std::runtime_error(error_);
    if (ready_[slot] != batch) throw std::runtime_error("the loader is closed");
    ++next_;
    return static_cast<int64_t>(slot);
  }

  // Hands a slot back to the workers once the caller no longer reads it.
  void release(int64_t slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (slot < 0 || static_cast<size_t>(slot) >= slots_.size()) throw py::value_error("no such slot");
    const uint64_t batch = ready_[slot];
    if (batch == kEmpty) throw py::value_error("slot " + std::to_string(slot) + " holds no batch");
    ready_[slot] = kEmpty;
    allowed_[slot] = batch + slots_.size();
    free_cv_.notify_all();
  }

  // Restart so that the next acquire() returns global batch `batch`.
  void seek(uint64_t batch) {
    if (closed_) throw std::runtime_error("the loader is closed");
    stop();
    start(batch);
  }

  void close() {
    stop();
    unmap();
  }

  uint64_t next_batch() const { return next_; }
  uint64_t windows() const { return windows_; }
  uint64_t tokens() const { return total_tokens_; }

 private:
  static constexpr uint64_t kEmpty = ~0ULL;

  void map_shards(const std::vector<std::string>& paths) {
    uint64_t offset = 0;
    for (const auto& path : paths) {
      int fd = ::open(path.c_str(), O_RDONLY);
      if (fd < 0) {
        unmap();
        throw std::runtime_error("cannot open shard " + path + ": " + std::strerror(errno));
      }
      struct stat st;
      if (::fstat(fd, &st) != 0) {
        int err = errno;
        ::close(fd);
        unmap();
        throw std::runtime_error("cannot stat shard " + path + ": " + std::strerror(err));
      }
      const size_t bytes = static_cast<size_t>(st.st_size);
      if (bytes % token_bytes_ != 0) {
        ::close(fd);
        unmap();
        throw py::value_error("shard " + path + " has " + std::to_string(bytes) +
                              " bytes, not a multiple of the token size " + std::to_string(token_bytes_));
      }
      Shard shard;
      shard.bytes = bytes;
      if (bytes > 0) {
        void* data = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
        if (data == MAP_FAILED) {
          int err = errno;
          ::close(fd);
          unmap();
          throw std::runtime_error("cannot map shard " + path + ": " + std::strerror(err));
        }
        shard.data = static_cast<const uint8_t*>(data);
      }
      ::close(fd);
      shards_.push_back(shard);
      starts_.push_back(offset);
      offset += bytes / token_bytes_;
    }
    total_tokens_ = offset;
  }

  void unmap() {
    for (auto& shard : shards_)
      if (shard.data) ::munmap(const_cast<uint8_t*>(shard.data), shard.bytes);
    shards_.clear();
    starts_.clear();
    closed_ = true;
  }

  void start(uint64_t first_batch) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t n = slots_.size();
    next_ = first_batch;
    claim_ = first_batch;
    ready_.assign(n, kEmpty);
    allowed_.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t b = first_batch + i;
      allowed_[b % n] = b;
    }
    stopping_ = false;
    error_.clear();
    for (int i = 0; i < workers_; ++i) threads_.emplace_back([this] { work(); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    free_cv_.notify_all();
    ready_cv_.notify_all();
    if (threads_.empty()) return;
    py::gil_scoped_release release;
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  void work() {
    const size_t n = slots_.size();
    while (true) {
      uint64_t batch;
      size_t slot;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (stopping_) return;
        batch = claim_++;
        slot = batch % n;
        free_cv_.wait(lock, [&] { return stopping_ || allowed_[slot] == batch; });
        if (stopping_) return;
      }
      try {
        fill(batch, reinterpret_cast<uint8_t*>(slots_[slot]));
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::string("loader worker failed: ") + e.what();
        ready_cv_.notify_all();
        return;
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ready_[slot] = batch;
      }
      ready_cv_.notify_all();
    }
  }

  std::shared_ptr<const std::vector<uint64_t>> permutation(uint64_t epoch) {
    std::lock_guard<std::mutex> lock(perm_mutex_);
    auto it = perms_.find(epoch);
    if (it != perms_.end()) return it->second;
    auto perm = std::make_shared<const std::vector<uint64_t>>(window_permutation(windows_, seed_, epoch));
    perms_[epoch] = perm;
    while (perms_.size() > 3) perms_.erase(perms_.begin());
    return perm;
  }

  void fill(uint64_t batch, uint8_t* out) {
    const uint64_t first = (batch * world_size_ + rank_) * batch_size_;
    std::shared_ptr<const std::vector<uint64_t>> perm;
    uint64_t perm_epoch = kEmpty;
    const size_t window_bytes = window_ * token_bytes_;
    std::vector<uint8_t> scratch(widen_ ? window_bytes : 0);
    for (int64_t b = 0; b < batch_size_; ++b) {
      const uint64_t position = first + b;
      const uint64_t epoch = position / windows_;
      uint64_t index = position % windows_;
      if (shuffle_) {
        if (epoch != perm_epoch) {
          perm = permutation(epoch);
          perm_epoch = epoch;
        }
        index = (*perm)[index];
      }
      if (!widen_) {
        copy_tokens(index * window_, window_, out + b * window_bytes);
        continue;
      }
      copy_tokens(index * window_, window_, scratch.data());
      int64_t* x = reinterpret_cast<int64_t*>(out) + b * (window_ - 1);
      int64_t* y = x + batch_size_ * (window_ - 1);
      if (token_bytes_ == 2)
        widen_row(reinterpret_cast<const uint16_t*>(scratch.data()), x, y);
      else
        widen_row(reinterpret_cast<const uint32_t*>(scratch.data()), x, y);
    }
  }

  template <typename Token>
  void widen_row(const Token* tokens, int64_t* x, int64_t* y) const {
    for (int64_t t = 0; t + 1 < window_; ++t) {
      x[t] = static_cast<int64_t>(tokens[t]);
      y[t] = static_cast<int64_t>(tokens[t + 1]);
    }
  }

  // Copies `count` tokens of the concatenated stream starting at `token`.
  void copy_tokens(uint64_t token, uint64_t count, uint8_t* out) const {
    size_t s = std::upper_bound(starts_.begin(), starts_.end(), token) - starts_.begin() - 1;
    while (count > 0) {
      const uint64_t in_shard = token - starts_[s];
      const uint64_t available = shards_[s].bytes / token_bytes_ - in_shard;
      const uint64_t take = std::min(available, count);
      if (take > 0) {
        std::memcpy(out, shards_[s].data + in_shard * token_bytes_, take * token_bytes_);
        out += take * token_bytes_;
        token += take;
        count -= take;
      }
      ++s;
    }
  }

  const size_t token_bytes_;
  const bool widen_;
  const int64_t batch_size_;
  const int64_t window_;
  const uint64_t seed_;
  const uint64_t rank_;
  const uint64_t world_size_;
  const bool shuffle_;
  const std::vector<uintptr_t> slots_;
  int workers_ = 1;

  std::vector<Shard> shards_;
  std::vector<uint64_t> starts_;
  uint64_t total_tokens_ = 0;
  uint64_t windows_ = 0;
  bool closed_ = false;

  std::mutex mutex_;
  std::condition_variable ready_cv_, free_cv_;
  std::vector<uint64_t> ready_, allowed_;
  uint64_t next_ = 0, claim_ = 0;
  bool stopping_ = false;
  std::string error_;
  std::vector<std::thread> threads_;

  std::mutex perm_mutex_;
  std::map<uint64_t, std::shared_ptr<const std::vector<uint64_t>>> perms_;
};

}  // namespace

PYBIND11_MODULE(_loader, m) {
  m.doc() = "Memory-mapped token shards batched by background threads (see tinyfuse.engine.loader).";
  py::class_<Loader>(m, "Loader")
      .def(py::init<const std::vector<std::string>&, int, int64_t, int64_t, uint64_t, int64_t, int64_t, bool,
                    const std::vector<uintptr_t>&, bool, int, uint64_t>(),
           py::arg("paths"), py::arg("token_bytes"), py::arg("batch_size"), py::arg("seq_len"), py::arg("seed"),
           py::arg("rank"), py::arg("world_size"), py::arg("shuffle"), py::arg("slots"), py::arg("widen"), py::arg("workers"),
           py::arg("first_batch"))
      .def("acquire", &Loader::acquire)
      .def("release", &Loader::release, py::arg("slot"))
      .def("seek", &Loader::seek, py::arg("batch"))
      .def("close", &Loader::close)
      .def_property_readonly("next_batch", &Loader::next_batch)
      .def_property_readonly("windows", &Loader::windows)
      .def_property_readonly("tokens", &Loader::tokens);
  m.def("window_permutation", &window_permutation, py::arg("windows"), py::arg("seed"), py::arg("epoch"));
}
