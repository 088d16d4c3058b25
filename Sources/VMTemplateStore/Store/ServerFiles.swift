import Foundation
import VMTemplateOS

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What `serve` keeps beside its socket while it runs, and finds again when it was killed: the
/// private directory it binds the socket in (`.serve-PID-START`, named by the server's process
/// identity) and the socket itself. A SIGKILLed server leaves both; `gc` and the next `serve`
/// remove them once the identity in the name no longer runs and nobody answers on the socket.
package enum ServerFiles {
    static let prefix = ".serve-"

    /// The private directory of this process, beside `socketPath`.
    package static func privateDirectory(beside socketPath: String) -> String {
        let pid = getpid()
        let start = ProcessIdentity.current(pid: pid)?.startTime ?? 0
        return "\(FileSystem.split(socketPath).directory)/\(prefix)\(pid)-\(start)"
    }

    /// The descriptor socket of the server whose API is on `socketPath`: `DIR/NAME-fds.sock` for
    /// `DIR/NAME.sock` (`STORE/serve-fds.sock` for the default), `PATH-fds` for any other name.
    package static func descriptorSocketPath(beside socketPath: String) -> String {
        socketPath.hasSuffix(".sock") ? "\(socketPath.dropLast(5))-fds.sock" : "\(socketPath)-fds"
    }

    /// Removes the private directories of servers that no longer run from the directory of
    /// `socketPath`, and the socket when it is this user's and nobody answers on it. Only this
    /// user's entries, never through a link. Returns the paths removed.
    package static func removeStale(beside socketPath: String) -> [String] {
        let directory = FileSystem.split(socketPath).directory
        var removed: [String] = []
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        for name in names where name.hasPrefix(prefix) {
            let path = "\(directory)/\(name)"
            var info = stat()
            guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == geteuid(),
                  !isRunning(serverNamed: String(name.dropFirst(prefix.count))) else { continue }
            if (try? FileSystem.removeTree(path: path)) != nil { removed.append(path) }
        }
        var info = stat()
        if lstat(socketPath, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK, info.st_uid == geteuid(),
           let address = UnixSocketAddress(path: socketPath) {
            // Bounded: a server whose backlog is full is alive, and must not hang gc.
            switch address.connectStream(until: .now + .seconds(1)) {
            case .success(let fd):
                close(fd)
            case .failure(let error) where error.code == ECONNREFUSED:
                if unlink(socketPath) == 0 { removed.append(socketPath) }
                // Its descriptor socket went with it.
                let descriptors = descriptorSocketPath(beside: socketPath)
                if lstat(descriptors, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK, info.st_uid == geteuid(), unlink(descriptors) == 0 {
                    removed.append(descriptors)
                }
            case .failure:
                break
            }
        }
        return removed
    }

    /// Whether `PID-START` (or `PID`, as earlier servers named it) still runs. A name that is
    /// neither is not a server's: left alone.
    private static func isRunning(serverNamed suffix: String) -> Bool {
        let parts = suffix.split(separator: "-", omittingEmptySubsequences: false)
        guard let pid = Int32(parts[0]), pid > 0, pid <= CloneRecord.maxPID else { return true }
        if parts.count == 2, let start = UInt64(parts[1]) {
            return ProcessIdentity(pid: pid, startTime: start).isAlive
        }
        guard parts.count == 1 else { return true }
        return kill(pid, 0) == 0 || errno == EPERM
    }
}
