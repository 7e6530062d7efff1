// The loop an app runs over an edge-sleep export folder, in C++17 against the ExecuTorch runtime
// (docs/on-device.md, "The loop on the device"). It opens each program with its weights and
// refuses a pair from two exports, then runs wake steps through train.pte's `step` (the app keeps
// the adapters between calls) and predictions through `logits` and infer.pte's `forward`.
//
//   cpp_loop EXPORT_DIR [STEPS]
//
// prints one line per step (loss, status) and exits 0; 2 with a message naming the file when the
// folder is refused. A sketch, not a library: the C API an app links is libedgesleep's.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::extension::make_tensor_ptr;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

namespace {

struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Refused("cannot read " + path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// manifest.json is written with one key per line; an app reads it with its JSON library.
std::string json_value(const std::string& json, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  const auto at = json.find(tag);
  if (at == std::string::npos) throw Refused("manifest.json has no " + key);
  const auto start = at + tag.size();
  if (json[start] == '"') return json.substr(start + 1, json.find('"', start + 1) - start - 1);
  return json.substr(start, json.find_first_of(",\n}", start) - start);
}

std::vector<std::string> json_strings(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\": [");
  std::vector<std::string> out;
  if (at == std::string::npos) return out;
  const auto end = json.find(']', at);
  for (auto q = json.find('"', json.find('[', at)); q < end; q = json.find('"', q + 1)) {
    const auto close = json.find('"', q + 1);
    out.push_back(json.substr(q + 1, close - q - 1));
    q = close;
  }
  return out;
}

// Open `pte` with its weights `ptd` and refuse the pair unless both carry the manifest's export id.
// `weights_id` reads nothing else from the .ptd: a foreign .ptd is found before any method that
// reads its weights is loaded.
std::unique_ptr<Module> open_program(const std::string& dir, const std::string& pte, const std::string& ptd,
                                     const std::string& export_id) {
  auto module = std::make_unique<Module>(dir + "/" + pte, dir + "/" + ptd);
  auto own = module->execute("export_id");
  if (!own.ok() || own->empty() || !own->at(0).isString())
    throw Refused(pte + " has no export id: re-export the folder");
  if (std::string(own->at(0).toString()) != export_id)
    throw Refused(pte + " is export " + std::string(own->at(0).toString()) + ", the manifest names " + export_id);
  auto stored = module->execute("weights_id");
  if (!stored.ok() || stored->empty() || !stored->at(0).isTensor())
    throw Refused(ptd + " holds no export id for " + pte + ": not its weights");
  const auto& t = stored->at(0).toTensor();
  const std::string got(t.const_data_ptr<char>(), static_cast<size_t>(t.numel()));
  if (got != export_id) throw Refused(ptd + " holds the weights of export " + got + ", not " + export_id);
  return module;
}

std::vector<SizesType> bound_shape(Module& m, const std::string& method, size_t input) {
  auto meta = m.method_meta(method);
  if (!meta.ok()) throw Refused("no method " + method);
  auto info = meta->input_tensor_meta(input);
  if (!info.ok()) throw Refused("bad input " + std::to_string(input) + " of " + method);
  const auto sizes = info->sizes();
  return {sizes.begin(), sizes.end()};
}

size_t numel(const std::vector<SizesType>& shape) {
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s EXPORT_DIR [STEPS]\n", argv[0]);
    return 1;
  }
  const std::string dir = argv[1];
  const int steps = argc > 2 ? std::atoi(argv[2]) : 20;
  try {
    const std::string manifest = read_file(dir + "/manifest.json");
    const std::string id = json_value(manifest, "export_id");
    auto infer = open_program(dir, "infer.pte", "weights.ptd", id);
    auto train = open_program(dir, "train.pte", "train.ptd", id);

    // what step takes (the manifest's signatures["train"]["step"]): x, y, [x_distill, z_distill,
    // x_label, y_label,] hyper, then the adapters in the manifest's "adapters" order
    const auto adapters = json_strings(manifest, "adapters");
    const size_t n_inputs = train->method_meta("step")->num_inputs();
    const bool replay = n_inputs == adapters.size() + 7;
    const float lr = std::stof(json_value(manifest, "lr"));
    const std::string clip = json_value(manifest, "max_grad_norm");
    const float max_norm = clip == "null" ? INFINITY : std::stof(clip);

    // a batch of 2 (the bounds are the largest; any batch from 1 to them runs)
    auto x_shape = bound_shape(*train, "step", 0);
    x_shape[0] = 2;
    std::mt19937 rng(0);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::vector<float> x(numel(x_shape));
    for (auto& v : x) v = unit(rng);
    const TensorPtr xs = make_tensor_ptr(x_shape, x);
    const TensorPtr ys = make_tensor_ptr({2}, std::vector<int64_t>{3, 7});
    // no replay term this step: one row of zeros and a weight of 0 each (the step's conventions)
    const size_t classes = static_cast<size_t>(std::stoi(json_value(manifest, "num_classes")));
    auto row_shape = x_shape;
    row_shape[0] = 1;
    const TensorPtr x_none = make_tensor_ptr(row_shape, std::vector<float>(numel(row_shape), 0.0f));
    const TensorPtr z_none = make_tensor_ptr({1, static_cast<SizesType>(classes)}, std::vector<float>(classes, 0.0f));
    const TensorPtr y_none = make_tensor_ptr({1}, std::vector<int64_t>{0});
    const TensorPtr hyper = make_tensor_ptr({4}, std::vector<float>{lr, max_norm, 0.0f, 0.0f});

    // fresh adapters, as after a night: A small and random, B zero (the model equals its base)
    std::vector<std::vector<float>> values;
    std::vector<std::vector<SizesType>> shapes;
    std::normal_distribution<float> normal(0.0f, 0.05f);
    for (size_t i = 0; i < adapters.size(); ++i) {
      shapes.push_back(bound_shape(*train, "step", n_inputs - adapters.size() + i));
      std::vector<float> v(numel(shapes.back()), 0.0f);
      if (adapters[i].size() > 7 && adapters[i].compare(adapters[i].size() - 7, 7, ".lora_a") == 0)
        for (auto& a : v) a = normal(rng);
      values.push_back(std::move(v));
    }

    for (int s = 0; s < steps; ++s) {
      std::vector<TensorPtr> keep;  // the adapter tensors live until the call returns
      std::vector<EValue> inputs{EValue(*xs), EValue(*ys)};
      if (replay)
        for (const auto* t : {&x_none, &z_none, &x_none, &y_none}) inputs.emplace_back(**t);
      inputs.emplace_back(*hyper);
      for (size_t i = 0; i < values.size(); ++i) {
        keep.push_back(make_tensor_ptr(shapes[i], values[i].data()));
        inputs.emplace_back(*keep.back());
      }
      auto out = train->execute("step", inputs);
      if (!out.ok()) throw Refused("step failed with error " + std::to_string(static_cast<int>(out.error())));
      // outputs: loss, new_loss, replay_loss, penalty, grad_norm, status, logits, *new adapters
      const float loss = out->at(0).toTensor().const_data_ptr<float>()[0];
      const int64_t status = out->at(5).toTensor().const_data_ptr<int64_t>()[0];
      for (size_t i = 0; i < values.size(); ++i) {  // keep what comes out (unchanged when status != 0)
        const auto& t = out->at(7 + i).toTensor();
        values[i].assign(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
      }
      std::printf("step %d loss %.6f status %lld\n", s, loss, static_cast<long long>(status));
    }

    // predictions: train.pte's logits with the live adapters; infer.pte serves the exported weights
    std::vector<TensorPtr> keep;
    std::vector<EValue> inputs{EValue(*xs)};
    for (size_t i = 0; i < values.size(); ++i) {
      keep.push_back(make_tensor_ptr(shapes[i], values[i].data()));
      inputs.emplace_back(*keep.back());
    }
    auto live = train->execute("logits", inputs);
    auto served = infer->execute("forward", std::vector<EValue>{EValue(*xs)});
    if (!live.ok() || !served.ok()) throw Refused("logits or forward failed");
    const auto& a = live->at(0).toTensor();
    const auto& b = served->at(0).toTensor();
    std::printf("logits %lld x %lld, forward %lld x %lld\n", static_cast<long long>(a.size(0)),
                static_cast<long long>(a.size(1)), static_cast<long long>(b.size(0)),
                static_cast<long long>(b.size(1)));
    return 0;
  } catch (const Refused& e) {
    std::fprintf(stderr, "refused: %s\n", e.what());
    return 2;
  }
}
