# Sourced by the other scripts: where the tools that bootstrap installs live,
# and a cargo target directory outside the clone, so that fresh clones and CI
# runs reuse one build.

# pip installs console scripts here (under pyenv too, where shims may lag).
if command -v python3 >/dev/null 2>&1; then
  pip_scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
  user_scripts=$(python3 -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))' 2>/dev/null)
  for dir in "$pip_scripts" "$user_scripts"; do
    case ":$PATH:" in *":$dir:"*) ;; *) [ -n "$dir" ] && PATH="$dir:$PATH" ;; esac
  done
fi
export PATH
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shop/target}"
