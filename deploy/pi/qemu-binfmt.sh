# shellcheck shell=bash
# Sourced by deploy/pi/qemu-proof.sh and deploy/podman/{base-image,build,compose}.sh: the kernel runs
# arm64 programs through Debian's qemu-aarch64-static (binfmt_misc), and is put back as it was after.
#
#   qemu_binfmt_on STATE    mount binfmt_misc and enable the qemu-aarch64 handler where they are not;
#                           appends to the file STATE each change as it makes it
#   qemu_binfmt_off STATE   undoes what STATE records, newest first, and removes STATE
#
# Needed, not just convenient: qemu-user emulates one program, and when it exec()s another arm64
# program (dpkg's maintainer scripts, python -m venv's ensurepip, pip's subprocesses, a container's
# processes) the host kernel must know to run that one through qemu as well. The handler must have the
# F (fix-binary) flag: the kernel opens qemu when the handler is registered, so a chroot or container
# needs no qemu of its own (Debian's qemu-user-static registers it so).
QEMU_BINFMT=/proc/sys/fs/binfmt_misc

qemu_binfmt_on() {
    local state=$1
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null; then
        echo "qemu-binfmt: apt-get install qemu-user-static binfmt-support (arm64 emulation)" >&2
        return 1
    fi
    touch "$state"
    if [[ ! -e $QEMU_BINFMT/status ]]; then
        # Containers often have binfmt_misc unmounted
        mount -t binfmt_misc binfmt_misc "$QEMU_BINFMT" || {
            echo "qemu-binfmt: cannot mount binfmt_misc (a container without the privilege?): run this on the host or a VM" >&2
            return 1
        }
        echo mounted >>"$state"
    fi
    if [[ ! -e $QEMU_BINFMT/qemu-aarch64 ]]; then
        update-binfmts --enable qemu-aarch64 || {
            echo "qemu-binfmt: cannot register the qemu-aarch64 binfmt handler (update-binfmts --enable qemu-aarch64)" >&2
            return 1
        }
        echo registered >>"$state"
    elif [[ $(head -1 "$QEMU_BINFMT/qemu-aarch64") != enabled ]]; then
        echo 1 >"$QEMU_BINFMT/qemu-aarch64"
        echo enabled >>"$state"
    fi
    grep -q '^flags:.*F' "$QEMU_BINFMT/qemu-aarch64" || {
        echo "qemu-binfmt: the qemu-aarch64 handler lacks the F flag: register it with fix_binary (Debian's qemu-user-static does; update-binfmts --disable qemu-aarch64, then --enable)" >&2
        return 1
    }
}

qemu_binfmt_off() {
    local state=$1 change
    [[ -f $state ]] || return 0
    for change in $(tac "$state"); do
        case $change in
            enabled) echo 0 >"$QEMU_BINFMT/qemu-aarch64" ;;
            registered) update-binfmts --disable qemu-aarch64 >/dev/null ;;
            mounted) umount "$QEMU_BINFMT" ;;
        esac || echo "qemu-binfmt: could not undo '$change' (see $QEMU_BINFMT)" >&2
    done
    rm -f "$state"
}
