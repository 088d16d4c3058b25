/// The one error type the library throws.
///
/// `message` is a sentence for the person at the terminal: what went wrong and what to do about it.
/// `cause` keeps the underlying detail (errno text, QEMU's stderr, a QMP error) for diagnosis.
public struct VMTemplateError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Codable {
        case invalidArgument
        case notFound
        case exists
        case invalidState
        case timeout
        case unsupported
        case qemuFailed
        case ioError
        case busy
        case limitExceeded
        case internalError
    }

    public let code: Code
    public let message: String
    public let cause: String?

    public init(_ code: Code, _ message: String, cause: String? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String {
        guard let cause, !cause.isEmpty else { return message }
        return "\(message)\n\(cause)"
    }
}
