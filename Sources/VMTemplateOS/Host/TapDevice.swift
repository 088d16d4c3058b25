import CLinuxHost

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A tap device opened for a clone's NIC: its descriptor goes to QEMU (QMP `getfd`), so QEMU never
/// needs the privilege to open it, nor to enter the namespace it lives in (Kata does the same).
package struct TapDevice: Sendable {
    /// The open tap (close-on-exec). The caller owns it and closes it once QEMU has its copy.
    package let descriptor: Int32
    package let name: String
    /// Made here rather than found: it is not persistent, so it disappears with the last
    /// descriptor, that is when the clone's QEMU exits.
    package let created: Bool

    /// Whether `name` can name a network interface: 1 to 15 bytes, letters, digits, `.`, `_`, `-`
    /// (the kernel's own limit is IFNAMSIZ - 1 bytes without `/`, `:` or spaces).
    package static func isValidName(_ name: String) -> Bool {
        guard (1...15).contains(name.utf8.count), name != ".", name != ".." else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a) || byte == 0x2e || byte == 0x5f || byte == 0x2d
        }
    }

    /// Opens tap `name` in the network namespace at `namespacePath` (a file such as
    /// `/run/netns/NAME`, as `ip netns` and CNI make them; nil: this process's namespace), creating
    /// it there if it does not exist.
    package static func open(name: String, namespacePath: String?) throws -> TapDevice {
        guard isValidName(name) else {
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(name))' is not an interface name: use 1 to 15 letters, digits, '.', '_' or '-'.")
        }
        var namespace: Int32 = -1
        if let namespacePath {
            namespace = try openNamespace(namespacePath)
        }
        defer { if namespace >= 0 { close(namespace) } }
        var created: Int32 = 0
        var stage: Int32 = 0
        let result = name.withCString { clinuxhost_open_tap(namespace, $0, &created, &stage) }
        guard result < 0 else { return TapDevice(descriptor: result, name: name, created: created != 0) }
        let code = -result
        let shownName = TerminalText.escape(name)
        let shownNamespace = namespacePath.map { " in network namespace '\(TerminalText.escape($0))'" } ?? ""
        let cause = SystemCallError(["setns", "socket", "open /dev/net/tun", "TUNSETIFF", "SIOCSIFFLAGS", "pthread_create"][max(0, min(5, Int(stage) - 1))], code: code)
        switch (stage, code) {
        case (1, EINVAL):
            // A namespace, but not a network namespace.
            throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(namespacePath ?? ""))' is not a network namespace: pass netns=/run/netns/NAME (ip netns list).", cause: cause)
        case (1, EPERM), (4, EPERM), (3, EACCES):
            throw VMTemplateError(.permissionDenied, "opening tap '\(shownName)'\(shownNamespace) needs root (CAP_NET_ADMIN): run as root, or use --nic user for a NIC without privileges.", cause: cause)
        case (4, EBUSY):
            throw VMTemplateError(.busy, "tap '\(shownName)'\(shownNamespace) is busy: another process (another clone?) has it open. Give this NIC a tap of its own.", cause: cause)
        case (4, EINVAL):
            throw VMTemplateError(.invalidArgument, "'\(shownName)'\(shownNamespace) exists but is not a tap device: pick another tap= name.", cause: cause)
        case (3, ENOENT):
            throw VMTemplateError(.unsupported, "/dev/net/tun is missing: load the tun module (modprobe tun).", cause: cause)
        default:
            throw VMTemplateError(.ioError, "cannot open tap '\(shownName)'\(shownNamespace): \(errnoText(code)).", cause: cause)
        }
    }

    /// Opens the namespace file at `path` for `setns`, after checking with `O_PATH` (which opens
    /// nothing) that it is one: a FIFO or a device file given as netns= is never really opened.
    static func openNamespace(_ path: String) throws -> Int32 {
        let shown = TerminalText.escape(path)
        let handle = Glibc.open(path, clinuxhost_o_path() | O_CLOEXEC)
        guard handle >= 0 else {
            let code = errno
            if code == ENOENT {
                // The host's state, not a missing template or clone (which is what notFound, 404,
                // tells a runtime): its sandbox's network was not set up.
                throw VMTemplateError(.invalidState, "network namespace '\(shown)' does not exist: create it (ip netns add NAME) or fix netns=.", cause: SystemCallError("open", code: code))
            }
            throw VMTemplateError(.ioError, "network namespace '\(shown)' cannot be opened: \(errnoText(code)).", cause: SystemCallError("open", code: code))
        }
        defer { close(handle) }
        let nsfsMagic = 0x6e73_6673
        guard clinuxhost_filesystem_type(handle) == nsfsMagic else {
            throw VMTemplateError(.invalidArgument, "'\(shown)' is not a namespace file: pass netns=/run/netns/NAME (ip netns list) or /proc/PID/ns/net.")
        }
        let namespace = Glibc.open("/proc/self/fd/\(handle)", O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        guard namespace >= 0 else {
            throw VMTemplateError(.ioError, "network namespace '\(shown)' cannot be opened: \(errnoText()).", cause: SystemCallError("open"))
        }
        return namespace
    }
}
