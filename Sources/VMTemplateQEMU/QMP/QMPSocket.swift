import VMTemplateOS
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Synchronization

// MARK: - Socket calls

enum UnixSocket {
    /// Polls `connect` until QEMU's listening socket accepts, the deadline passes, or the peer dies.
    static func connectPolling(
        path: String,
        deadline: ContinuousClock.Instant,
        timeout: Duration,
        isPeerAlive: @Sendable () -> Bool
    ) async throws -> Int32 {
        guard let address = UnixSocketAddress(path: path) else {
            throw VMTemplateError(
                .invalidArgument,
                "The QMP socket path \(path) is empty or longer than a Unix socket path may be "
                    + "(\(UnixSocketAddress.maxPathBytes) bytes).")
        }

        var lastError: Int32 = ENOENT
        while true {
            switch attempt(address) {
            case .success(let fd):
                return fd
            case .failure(let error)
            where [ENOENT, ECONNREFUSED, EAGAIN, EINTR].contains(error.code):
                // Not there yet (ENOENT), a stale socket file from an earlier QEMU (ECONNREFUSED), or
                // the listen backlog is full (EAGAIN): worth another try.
                lastError = error.code
            case .failure(let error):
                throw VMTemplateError(
                    .ioError, "Could not connect to the QMP socket \(path).", cause: error)
            }
            guard isPeerAlive() else {
                throw VMTemplateError(
                    .qemuFailed, "QEMU exited before its QMP socket \(path) accepted a connection.")
            }
            guard ContinuousClock.now < deadline else {
                throw VMTemplateError(
                    .timeout,
                    "Timed out after \(timeout.shortText) waiting for the QMP socket \(path) to accept a connection.",
                    cause: SystemCallError("connect", code: lastError))
            }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// One connection attempt, returning a blocking socket on success.
    private static func attempt(_ address: UnixSocketAddress) -> Result<Int32, SystemCallError> {
        // Non-blocking only for `connect`, which would otherwise wait when the backlog is full.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return .failure(SystemCallError("socket", code: errno)) }
        let result = address.withSockaddr { connect(fd, $0, $1) }
        guard result == 0 else {
            let code = errno
            close(fd)
            return .failure(SystemCallError("connect", code: code))
        }
        // The reader thread wants blocking reads. Writes get a send timeout so that a QEMU that
        // stopped reading cannot hang a caller forever.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        var sendTimeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &sendTimeout, socklen_t(MemoryLayout<timeval>.size))
        return .success(fd)
    }

    /// Writes all of `bytes`; returns the errno of a failure, or nil.
    static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32? {
        guard let base = bytes.baseAddress else { return nil }
        var offset = 0
        while offset < bytes.count {
            // MSG_NOSIGNAL: a peer that hung up must give EPIPE, not kill the process with SIGPIPE.
            let written = send(fd, base + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
            if written >= 0 {
                offset += written
            } else {
                let code = errno
                if code != EINTR { return code }
            }
        }
        return nil
    }

    static func closeDescriptor(_ fd: Int32) {
        _ = close(fd)
    }
}

