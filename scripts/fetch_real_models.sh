#!/usr/bin/env bash
# Fetch real pretrained ONNX models exported by non-PyTorch tools, taken from wheels on the package registry (pip
# download, no install); only the .onnx files are kept. Tests that use them skip when DEST lacks them.
#   paddle_ppocr_cls.onnx  PaddleOCR text-direction classifier (MobileNetV3, paddle2onnx; weights are Constant nodes)
#   paddle_ppocr_det.onnx  PaddleOCR PP-OCRv4 text detector (paddle2onnx; Constant-node weights, Resize, ConvTranspose)
#   tf_speech_embedding.onnx  openWakeWord's speech embedding CNN (tf2onnx from TensorFlow; NHWC input [N, 76, 32, 1])
# Usage: scripts/fetch_real_models.sh DEST
set -euo pipefail
dest=${1:?usage: fetch_real_models.sh DEST}
python=${PYTHON:-python3}
if [ -f "$dest/tf_speech_embedding.onnx" ] && [ -f "$dest/paddle_ppocr_cls.onnx" ] && [ -f "$dest/paddle_ppocr_det.onnx" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --disable-pip-version-check -d "$work" \
  "rapidocr-onnxruntime==1.4.4" "openwakeword==0.4.0"
mkdir -p "$dest"
"$python" - "$work" "$dest" <<'PY'
import glob, sys, zipfile
work, dest = sys.argv[1], sys.argv[2]
wanted = {
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "paddle_ppocr_cls.onnx",
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "paddle_ppocr_det.onnx",
    "openwakeword/resources/models/embedding_model.onnx": "tf_speech_embedding.onnx",
}
found = set()
for wheel in glob.glob(f"{work}/*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for member, target in wanted.items():
            if member in z.namelist():
                with open(f"{dest}/{target}", "wb") as f:
                    f.write(z.read(member))
                found.add(member)
missing = set(wanted) - found
if missing:
    sys.exit(f"fetch_real_models: not found in the downloaded wheels: {sorted(missing)}")
PY
echo "fetched real models into $dest"
