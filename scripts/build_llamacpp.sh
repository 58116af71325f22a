#!/usr/bin/env bash
# Builds the fast inference engine from source, once per environment: llama.cpp from the vendor tree
# of the `llama-cpp-python` source package (the registry has no wheel for it), its Python bindings
# from the same package, and `llama-bench` from the same tree for bench/inference.py.
#
#   scripts/build_llamacpp.sh VENV          # the engine, native to this CPU
#   scripts/build_llamacpp.sh VENV avx2     # also an AVX2-only build, for bench/as_avx2.sh
#
# Everything lands under VENV/llama.cpp; the shared libraries are copied beside the bindings, where
# they look for them. The build is native to this CPU (GGML_NATIVE), so it is never copied between
# machines: a fresh environment builds its own.
set -euo pipefail
venv=${1:?usage: build_llamacpp.sh VENV [avx2]}
variant=${2:-native}
version=0.3.36
root="$venv/llama.cpp"
src="$root/llama_cpp_python-$version"
build="$root/build"
jobs=$(nproc)
mkdir -p "$root"

if [ ! -d "$src" ]; then
    "$venv/bin/pip" download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$root"
    tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi

# cmake and ninja from the system, else from the package registry.
command -v cmake >/dev/null || { "$venv/bin/pip" install -q cmake ninja && export PATH="$(cd "$venv" && pwd)/bin:$PATH"; }
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cpu=(-DGGML_NATIVE=ON)
if [ "$variant" = avx2 ]; then
    # What a CPU without AVX-512 runs: bench/as_avx2.sh loads this build (LLAMA_CPP_LIB_PATH).
    build="$root/build-avx2"
    cpu=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
         -DGGML_AVX512=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_BF16=OFF)
fi
started=$(date +%s)
cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" "${cpu[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target llama llama-bench
echo "llama.cpp ($variant): built in $(( $(date +%s) - started )) s on $jobs jobs"
[ "$variant" = avx2 ] && exit 0

# The bindings alone: their own build of llama.cpp is switched off, ours is copied in.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$venv/bin/pip" install -q "$src"
# The converter (convert_hf_to_gguf.py) reads SentencePiece tokenizers with it.
"$venv/bin/pip" install -q sentencepiece
lib=$("$venv/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llama_cpp")
print(pathlib.Path(spec.origin).parent / "lib")
PY
)
mkdir -p "$lib"
find "$build/bin" -maxdepth 1 -name '*.so*' -exec cp -P {} "$lib/" \;
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'loads', llama_cpp.llama_print_system_info().decode()[:60])"
