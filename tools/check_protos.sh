#!/usr/bin/env bash
# Lint the protobuf contract with buf and check it for breaking changes against the
# previous commit. buf comes from the npm package @bufbuild/buf, installed on first use
# into .tools/ (ignored by git).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
buf="$tools/node_modules/.bin/buf"
if [[ ! -x $buf ]]; then
  mkdir -p "$tools"
  npm install --silent --prefix "$tools" @bufbuild/buf@1.75.0 >/dev/null
fi
cd "$root/protos"
"$buf" lint
echo "buf lint: ok"
base=${PROTO_BASE_REF:-HEAD~1}
# buf clones the repository at the ref and accepts only a full commit id or a ref name, so an
# abbreviated id is resolved first.
commit=$(git -C "$root" rev-parse --verify --quiet "$base^{commit}" || true)
if [[ -n $commit ]] && git -C "$root" cat-file -e "$commit:protos/buf.yaml" 2>/dev/null; then
  "$buf" breaking --against "$root/.git#ref=$commit,subdir=protos"
  echo "buf breaking against $base: ok"
else
  echo "buf breaking: skipped, $base has no protos/buf.yaml to compare with"
fi
