#!/usr/bin/env bash
# A signed debug APK of the koedge demo without Gradle or the Android SDK:
#   Maven (Kotlin, engine + app jars) -> dx (com.jakewharton.android.repackaged:dalvik-dx from Maven Central)
#   -> aapt (Debian) links the manifest against framework-res.apk (Debian android-framework-res, API 29)
#   -> classes.dex and onnxruntime's lib/arm64-v8a/*.so added -> zipalign -> apksigner (debug key) ->
#   `apksigner verify` and `aapt dump badging`.
#
#   android-demo/tools/build-apk.sh [--aar PATH] [--without-native]
#
# onnxruntime's Android AAR (com.microsoft.onnxruntime:onnxruntime-android, same version as pom.xml) supplies the
# ai.onnxruntime classes and the arm64-v8a library; it is fetched with Maven unless --aar names a local copy.
# --without-native builds the APK with the desktop jar's ai.onnxruntime classes and NO native library: the
# packaging is checked, but that APK cannot run (loading a bundle would fail). Needs: java, mvn, and
#   apt-get install aapt zipalign apksigner android-framework-res
# Output: android-demo/app/target/apk/koedge-demo-debug.apk. Running it needs a phone (docs/android.md).
set -euo pipefail

DEMO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$DEMO/app/target/apk"
AAR=""
WITHOUT_NATIVE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --aar) AAR="$2"; shift 2 ;;
    --without-native) WITHOUT_NATIVE=1; shift ;;
    *) echo "usage: $0 [--aar PATH] [--without-native]" >&2; exit 2 ;;
  esac
done

for tool in java mvn aapt zipalign apksigner keytool unzip zip; do
  command -v "$tool" >/dev/null || { echo "build-apk: $tool not found (apt-get install aapt zipalign apksigner android-framework-res)" >&2; exit 1; }
done
FRAMEWORK=/usr/share/android-framework-res/framework-res.apk
[ -f "$FRAMEWORK" ] || { echo "build-apk: $FRAMEWORK missing (apt-get install android-framework-res)" >&2; exit 1; }

ORT_VERSION="$(sed -n 's:.*<onnxruntime.version>\(.*\)</onnxruntime.version>.*:\1:p' "$DEMO/pom.xml")"
DX_VERSION=16.0.1
rm -rf "$OUT" && mkdir -p "$OUT/classes" "$OUT/apk/lib/arm64-v8a"

echo "== compile (Maven)"
(cd "$DEMO" && mvn -q -B -o -pl app -am package -DskipTests 2>/dev/null || mvn -q -B -pl app -am package -DskipTests)
(cd "$DEMO" && mvn -q -B dependency:copy -Dartifact=com.jakewharton.android.repackaged:dalvik-dx:$DX_VERSION \
  -DoutputDirectory="$OUT" -Dmdep.stripVersion=true)

echo "== onnxruntime $ORT_VERSION for Android"
if [ "$WITHOUT_NATIVE" = 1 ]; then
  cp "$DEMO/engine/target/lib/onnxruntime-$ORT_VERSION.jar" "$OUT/ort-desktop.jar"
  (cd "$OUT" && mkdir ort && cd ort && unzip -q ../ort-desktop.jar 'ai/onnxruntime/*'; rm -rf ai/onnxruntime/native && zip -qr ../ort-classes.jar ai)
  echo "   WITHOUT the native library: this APK is for checking the packaging only, it cannot run"
else
  if [ -z "$AAR" ]; then
    (cd "$DEMO" && mvn -q -B dependency:copy -Dartifact=com.microsoft.onnxruntime:onnxruntime-android:$ORT_VERSION:aar \
      -DoutputDirectory="$OUT" -Dmdep.stripVersion=true) || {
      echo "build-apk: cannot fetch com.microsoft.onnxruntime:onnxruntime-android:$ORT_VERSION (pass --aar PATH, or --without-native to check the packaging only)" >&2; exit 1; }
    AAR="$OUT/onnxruntime-android.aar"
  fi
  (cd "$OUT" && mkdir aar && cd aar && unzip -q "$AAR" classes.jar 'jni/arm64-v8a/*')
  cp "$OUT/aar/classes.jar" "$OUT/ort-classes.jar"
  cp "$OUT"/aar/jni/arm64-v8a/*.so "$OUT/apk/lib/arm64-v8a/"
fi

echo "== dex (dx $DX_VERSION, no desugaring: our sources are compiled without invokedynamic)"
# kotlin-stdlib 2.x itself holds invokedynamic (lambdas in joinToString, compareBy, ...): dx writes them as
# invoke-custom, which needs API 26, and ART has no LambdaMetafactory to bootstrap them, so those stdlib methods
# would fail if called on a phone. The Gradle build (D8) desugars them; this APK checks the packaging.
STDLIB="$(ls "$DEMO"/engine/target/lib/kotlin-stdlib-*.jar)"
# kotlin-stdlib's module-info and Java 9+ multi-release classes are not for ART
(cd "$OUT" && mkdir stdlib && cd stdlib && unzip -q "$STDLIB" -x 'META-INF/*' 'module-info.class' && zip -qr ../kotlin-stdlib.jar .)
INDY=$(for jar in "$DEMO/app/target/koedge-demo-app-0.1.0.jar" "$DEMO/engine/target/koedge-engine.jar"; do
  javap -c -p -cp "$jar" $(unzip -Z1 "$jar" | grep '\.class$' | sed 's/\.class$//; s:/:.:g') 2>/dev/null | grep -c invokedynamic || true; done | paste -sd+ | bc)
echo "   invokedynamic in the app and engine classes: $INDY"
[ "$INDY" = 0 ] || { echo "build-apk: invokedynamic found; ART without D8 desugaring cannot link it" >&2; exit 1; }
java -cp "$OUT/dalvik-dx.jar" com.android.dx.command.Main --dex --min-sdk-version=26 --output="$OUT/apk/classes.dex" \
  "$DEMO/app/target/koedge-demo-app-0.1.0.jar" "$DEMO/engine/target/koedge-engine.jar" "$OUT/kotlin-stdlib.jar" \
  "$OUT/ort-classes.jar"

echo "== manifest and resources (aapt, framework-res API 29)"
sed -e 's#<manifest xmlns:android="http://schemas.android.com/apk/res/android"#<manifest xmlns:android="http://schemas.android.com/apk/res/android" package="org.koedge.demo"#' \
    -e 's#^    <application#    <uses-sdk android:minSdkVersion="26" android:targetSdkVersion="29" />\n\n    <application#' \
    "$DEMO/app/src/main/AndroidManifest.xml" > "$OUT/AndroidManifest.xml"
aapt package -f -M "$OUT/AndroidManifest.xml" -I "$FRAMEWORK" -F "$OUT/unsigned.apk"
(cd "$OUT/apk" && aapt add -f "$OUT/unsigned.apk" classes.dex >/dev/null && if ls lib/arm64-v8a/*.so >/dev/null 2>&1; then aapt add -f "$OUT/unsigned.apk" lib/arm64-v8a/*.so >/dev/null; fi)

echo "== align and sign (debug key)"
zipalign -f -p 4 "$OUT/unsigned.apk" "$OUT/aligned.apk"
KEYSTORE="$OUT/debug.keystore"
keytool -genkeypair -keystore "$KEYSTORE" -storepass android -keypass android -alias androiddebugkey -keyalg RSA \
  -keysize 2048 -validity 10000 -dname "CN=Android Debug,O=Android,C=US" >/dev/null 2>&1
apksigner sign --ks "$KEYSTORE" --ks-pass pass:android --key-pass pass:android --out "$OUT/koedge-demo-debug.apk" "$OUT/aligned.apk"

echo "== checks"
apksigner verify --verbose "$OUT/koedge-demo-debug.apk" | head -5
aapt dump badging "$OUT/koedge-demo-debug.apk" | grep -E "^(package|sdkVersion|targetSdkVersion|launchable-activity|native-code)" || true
unzip -l "$OUT/koedge-demo-debug.apk" | tail -n +4 | head -n -2 | awk '{print "   " $4 "  " $1 " bytes"}'
ls -l "$OUT/koedge-demo-debug.apk" | awk '{print "APK: " $9 " (" $5 " bytes)"}'
