import Foundation

/// The JSON conventions of everything vmtemplate writes: sorted keys (stable diffs and digests),
/// ISO 8601 dates, snake_case keys spelled out in each type's `CodingKeys`.
package enum JSONCoding {
    package static func encoder(pretty: Bool = true) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    package static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// `value` as JSON, absent values as `null` (``JSONTree``).
    package static func encode(_ value: some Encodable, pretty: Bool = true) throws -> Data {
        var data = try encoder(pretty: pretty).encode(JSONTree.of(value))
        data.append(0x0a)
        return data
    }

    /// A single-line rendering, for `--json` output and JSON-lines logs.
    package static func line(_ value: some Encodable) throws -> String {
        String(decoding: try encoder(pretty: false).encode(JSONTree.of(value)), as: UTF8.self)
    }
}

/// Short, human descriptions of `DecodingError`s (the default ones are long debug dumps naming
/// Swift types): a phrase without a final period, for the caller's sentence to carry.
package enum JSONErrorText {
    package static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return VMTemplateError.phrase("\(error)") }
        func path(_ context: DecodingError.Context) -> String? {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? nil : "'\(keys.joined(separator: "."))'"
        }
        switch error {
        case .keyNotFound(let key, let context):
            return path(context).map { "\($0) has no '\(key.stringValue)'" } ?? "'\(key.stringValue)' is missing"
        case .typeMismatch(let type, let context):
            return "\(path(context) ?? "the whole file") must be \(kind(of: type))"
        case .valueNotFound(let type, let context):
            return "\(path(context) ?? "the whole file") must be \(kind(of: type)), not null"
        case .dataCorrupted(let context):
            guard let where_ = path(context) else { return "it is not JSON" }
            // "Cannot initialize GuestClock from invalid String value ntp": the value, not the type.
            if let range = context.debugDescription.range(of: "invalid String value ") {
                return "\(where_) cannot be '\(context.debugDescription[range.upperBound...])'"
            }
            return "\(where_) is not valid (\(VMTemplateError.phrase(context.debugDescription)))"
        @unknown default:
            return VMTemplateError.phrase("\(error)")
        }
    }

    /// What a JSON value of a Swift type is, in words.
    static func kind(of type: Any.Type) -> String {
        let name = String(describing: type)
        if name == "String" { return "a string" }
        if name == "Bool" { return "true or false" }
        if ["Int", "Int32", "Int64", "UInt", "UInt16", "UInt32", "UInt64", "Double", "Float"].contains(name) { return "a number" }
        if name.hasPrefix("Array") || name.hasPrefix("[") { return "a list" }
        if name.hasPrefix("Dictionary") || name.hasPrefix("Optional<Dictionary") { return "an object" }
        return "another kind of value"
    }
}

extension JSONCoding {
    /// Refuses a JSON object that has a key not in `known`, naming it (bounded, escaped): a request
    /// body's misspelt field would otherwise be ignored, and what it asked for silently not done.
    package static func refuseUnknownKeys(_ decoder: any Decoder, known: [String], in what: String) throws {
        let container = try decoder.container(keyedBy: AnyCodingKey.self)
        if let unknown = container.allKeys.first(where: { !known.contains($0.stringValue) }) {
            throw VMTemplateError(.invalidArgument, "unknown field '\(TerminalText.escape(String(unknown.stringValue.prefix(64))))' in \(what): the fields are \(known.joined(separator: ", ")).")
        }
    }

    private struct AnyCodingKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
