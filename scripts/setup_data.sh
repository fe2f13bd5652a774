#!/usr/bin/env bash
# Installs the example data the domains read, where apt exists (Debian/Ubuntu; root or sudo):
#   python3.11-doc          the language domain's default corpus (Python documentation sources)
#   maffilter-examples      the DNA domain's genomes (primate chr22 alignment, U. maydis + GFF3)
#   espeak-ng               the audio domain's spoken digits
#   fluidsynth, timgm6mb-soundfont, planetblupi-music-midi   the audio domain's music
# Without apt it says what to install and exits 0: every domain also reads files you name.
set -euo pipefail
packages=(python3.11-doc maffilter-examples espeak-ng fluidsynth timgm6mb-soundfont planetblupi-music-midi)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_data: no apt-get here; install these packages (or point the configs at your own files): ${packages[*]}"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup_data: not root and no sudo; install as root: apt-get install -y ${packages[*]}"; exit 0; fi
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "setup_data: ${packages[*]} installed"
