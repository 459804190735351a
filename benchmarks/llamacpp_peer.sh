#!/usr/bin/env bash
# llama.cpp as a CPU inference peer on an HF Qwen3-MoE checkpoint: llamacpp_peer.sh CKPT_DIR SCRATCH
# Builds llama-bench from the llama.cpp tree vendored in the llama-cpp-python sdist (cached under SCRATCH), converts the
# checkpoint to GGUF (f32 and bf16, hf2gguf_qwen3moe.py beside this script, numpy + the tree's gguf-py), and prints one JSON line:
# pp512 (prefill tok/s, best of flash-attention on/off) and tg128 (decode tok/s), f32 and bf16, 2 threads.
set -u
ck=$1; S=$2; here=$(cd "$(dirname "$0")" && pwd)
V=0.3.36; L=$S/lcp/llama_cpp_python-$V/vendor/llama.cpp
command -v cmake >/dev/null || apt-get install -y -q cmake >/dev/null 2>&1 || { echo "no cmake"; exit 1; }
if [ ! -d "$L" ]; then
  mkdir -p "$S/lcp" && python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$S/lcp" llama-cpp-python==$V >/dev/null 2>&1 \
    && tar -xzf "$S/lcp/llama_cpp_python-$V.tar.gz" -C "$S/lcp" || { echo "cannot get llama.cpp sources"; exit 1; }
fi
B=$S/lcbuild
if [ ! -x "$B/bin/llama-bench" ]; then
  cmake -S "$L" -B "$B" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >/dev/null 2>&1 \
    && cmake --build "$B" --target llama-bench -j2 >/dev/null 2>&1 || { echo "llama.cpp build failed"; exit 1; }
fi
GV=$S/gguf-venv
[ -x "$GV/bin/python" ] || { python3 -m venv "$GV" && "$GV/bin/pip" -q install numpy pyyaml tqdm requests >/dev/null 2>&1; }
for t in f32 bf16; do
  [ -s "$S/peer-$t.gguf" ] && [ "$S/peer-$t.gguf" -nt "$ck/model.safetensors" ] || \
    PYTHONPATH=$L/gguf-py "$GV/bin/python" "$here/hf2gguf_qwen3moe.py" "$ck" "$S/peer-$t.gguf" $t >/dev/null 2>&1 || { echo "gguf conversion failed"; exit 1; }
done
ts() { "$B/bin/llama-bench" -m "$1" "${@:2}" -t 2 -o json 2>/dev/null | python3 -c "import json,sys; print(max(x['avg_ts'] for x in json.load(sys.stdin)))"; }
python3 - "$(ts $S/peer-f32.gguf -p 512 -n 0 -r 5 -fa 0,1)" "$(ts $S/peer-bf16.gguf -p 512 -n 0 -r 5 -fa 0,1)" \
  "$(ts $S/peer-f32.gguf -p 0 -n 128 -r 3)" "$(ts $S/peer-bf16.gguf -p 0 -n 128 -r 3)" <<'PY'
import json, sys
a = [float(x) for x in sys.argv[1:]]
print(json.dumps(dict(pp512_f32=a[0], pp512_bf16=a[1], tg128_f32=a[2], tg128_bf16=a[3])))
PY
