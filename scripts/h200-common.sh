# Shared by the scripts/h200-issue*.sh steps (sourced, not run): the GPU host's set-up.
# Needs $OUT (the device tool's output folder) and .gpu/ carried as each script says.
D=/tmp/duo/duo
mkdir -p /tmp/duo "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Everything under $OUT packed into $OUT/results.tgz: the device tool brings back at most 8
# files (use as `trap pack_out EXIT` where a step writes more).
pack_out() { tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/" && ls -la "$OUT"; }

# The stripped, xz-packed binaries built on the build machine (those that were carried;
# duo-take: a build of the same tree with a patch under test, for the scripts that name it).
for f in duo duo-take cuda_backend; do [ -f ".gpu/bin/$f.xz" ] && xz -dc ".gpu/bin/$f.xz" > "/tmp/duo/$f" && chmod +x "/tmp/duo/$f"; done
# The kernels' PTX compiled on the build machine (scripts/gpu-prep.sh), into the kernel cache
# every script uses (DUO_KERNEL_CACHE=/tmp/duo/kc): forms found there are not compiled again.
# (Set but empty or 0: keep none, as duo reads it; nothing is unpacked then.)
export DUO_KERNEL_CACHE=${DUO_KERNEL_CACHE-/tmp/duo/kc}
if [ -f .gpu/bin/kc.tar.xz ] && [ -n "$DUO_KERNEL_CACHE" ] && [ "$DUO_KERNEL_CACHE" != 0 ]; then mkdir -p "$DUO_KERNEL_CACHE" && xz -dc .gpu/bin/kc.tar.xz | tar -C "$DUO_KERNEL_CACHE" -xf - && echo "kernel cache: $(ls "$DUO_KERNEL_CACHE" | wc -l) forms"; fi

# The default model from its two parts (part 1 left in /tmp by the previous call, part 2
# carried by this one), checked, and put where duo looks for it.
join_model() {
  cp .gpu/model.part2 /tmp/duo/model.part2
  cat /tmp/duo/model.part1 /tmp/duo/model.part2 > /tmp/duo/model.gguf
  cache_model
}

# The same from the xz-packed parts (.gpu/ma/model.xz.part1 left in /tmp as
# /tmp/duo/model.ma by an earlier call, .gpu/mb/model.xz.part2 carried by this one);
# nothing to do where an earlier call on this warm machine already put the model in place.
join_packed_model() {
  export DUO_CACHE=/tmp/duo/cache
  [ -f $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf ] && return 0
  cat /tmp/duo/model.ma .gpu/mb/model.xz.part2 | xz -dc > /tmp/duo/model.gguf
  cache_model
}

# The same from the xz-packed parts (scripts/gpu-prep.sh), one carried per call: each call
# stashes its part in /tmp (`stash_part N`, .gpu/mN carried), and the one that holds them
# all joins them (`join_parts`: /tmp/duo/m1, m2, ... in order, the checksum below catching a
# missing one); nothing to do where an earlier call already put the model in place.
stash_part() { cp ".gpu/m$1/p" "/tmp/duo/m$1"; ls -la /tmp/duo | grep -E " m[0-9]$" || true; }
join_parts() {
  export DUO_CACHE=/tmp/duo/cache
  [ -f $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf ] && return 0
  local i=1 files=()
  while [ -f "/tmp/duo/m$i" ]; do files+=("/tmp/duo/m$i"); i=$((i + 1)); done
  cat "${files[@]}" | xz -dc > /tmp/duo/model.gguf
  cache_model
}
# The name the scripts of sessions 24-25 call it by (three parts then).
join_three_parts() { join_parts; }

# /tmp/duo/model.gguf checked and put where duo looks for the default model.
cache_model() {
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/duo/model.gguf" | sha256sum -c || exit 1
  export DUO_CACHE=/tmp/duo/cache
  mkdir -p $DUO_CACHE
  cp /tmp/duo/model.gguf $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf.sha256
}
