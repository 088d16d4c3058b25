import Foundation

/// The one error type the library throws.
///
/// `message` is a sentence for the person at the terminal: what went wrong and what to do about it.
/// `cause` keeps what went wrong underneath as an error of its own (a `QMPError` with QEMU's error
/// class, a `SystemCallError` with its errno, a `QEMUExit` with QEMU's last words), so callers can
/// tell causes apart and the detail reaches the user unchanged.
public struct VMTemplateError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable, Codable, CaseIterable {
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
        case permissionDenied
        /// A template's files differ from its manifest.
        case integrityFailure
        case internalError
    }

    public let code: Code
    public let message: String
    public let cause: (any Error)?

    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    /// Free-text detail (a console tail, a child's stderr) as the cause.
    public init(_ code: Code, _ message: String, detail: String) {
        self.init(code, message, cause: ErrorDetail(detail))
    }

    /// The cause as text, for terminals and logs; nil when there is none or it says nothing.
    public var causeText: String? {
        guard let cause else { return nil }
        let text = "\(cause)"
        return text.isEmpty ? nil : text
    }

    public var description: String {
        guard let causeText else { return message }
        return "\(message)\n\(causeText)"
    }
}

/// `{"error": {"code", "message"}}`: what the CLI prints with `--json` and the API answers when
/// something fails.
package struct ErrorBody: Codable, Sendable {
    public struct Detail: Codable, Sendable {
        public var code: String
        public var message: String
    }

    public var error: Detail

    public init(code: VMTemplateError.Code, message: String) {
        error = Detail(code: code.rawValue, message: message)
    }

    /// The error's code, when it is one this build knows.
    package var code: VMTemplateError.Code? { VMTemplateError.Code(rawValue: error.code) }
}

extension VMTemplateError {
    /// What a person is shown of any error in a line of its own (a log line, a problem in a
    /// list, a record field): a library error's message without its cause block, anything else
    /// on one line.
    public static func oneLine(_ error: any Error) -> String {
        if let error = error as? VMTemplateError { return error.message }
        return "\(error)".split(whereSeparator: \.isNewline).joined(separator: "; ")
    }

    /// Another's message (QEMU's, Foundation's) as a phrase inside a sentence of ours: without
    /// surrounding white space and final periods, which such messages have or not, so that the
    /// sentence ends with exactly one.
    public static func phrase(_ text: String) -> String {
        var text = text.trimmingCharacters(in: .whitespacesAndNewlines)
        while text.hasSuffix(".") { text.removeLast() }
        return text
    }
}

/// Text that explains an error but is not an error of a known kind (a console's last lines, the
/// stderr of a probe): the cause of a `VMTemplateError` when nothing more structured exists.
package struct ErrorDetail: Error, Sendable, CustomStringConvertible {
    public let text: String

    public init(_ text: String) {
        self.text = text
    }

    public var description: String { text }
}
