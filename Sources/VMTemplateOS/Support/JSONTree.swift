import Foundation

/// A JSON document as a value, and an `Encoder` that builds one: what ``JSONCoding`` encodes with,
/// so that an absent value is written as `null` instead of being left out.
///
/// Swift's synthesized `Encodable` calls `encodeIfPresent` for optional properties, which
/// `JSONEncoder` answers by writing nothing: a key that is there in one output and missing in the
/// next, which JSON Schemas and strict clients refuse. This encoder's containers answer it with
/// `null`, for every type at once; `JSONEncoder` then only formats the finished tree (sorted keys,
/// escaping, numbers), so the text is what it was apart from the nulls.
enum JSONTree: Encodable {
    case null
    case bool(Bool)
    case int(Int64)
    case unsigned(UInt64)
    case double(Double)
    case string(String)
    case array([JSONTree])
    case object([String: JSONTree])

    func encode(to encoder: any Encoder) throws {
        switch self {
        case .array(let values):
            var container = encoder.unkeyedContainer()
            for value in values { try container.encode(value) }
        case .object(let members):
            var container = encoder.container(keyedBy: Key.self)
            for (key, value) in members { try container.encode(value, forKey: Key(key)) }
        default:
            var container = encoder.singleValueContainer()
            switch self {
            case .null: try container.encodeNil()
            case .bool(let value): try container.encode(value)
            case .int(let value): try container.encode(value)
            case .unsigned(let value): try container.encode(value)
            case .double(let value): try container.encode(value)
            case .string(let value): try container.encode(value)
            case .array, .object: break
            }
        }
    }

    struct Key: CodingKey {
        let stringValue: String
        init(_ string: String) { stringValue = string }
        init?(stringValue: String) { self.stringValue = stringValue }
        var intValue: Int? { nil }
        init?(intValue: Int) { stringValue = String(intValue) }
    }

    /// The tree of `value`; dates as ISO 8601 strings (`JSONEncoder`'s `.iso8601`).
    static func of(_ value: some Encodable) throws -> JSONTree {
        try TreeEncoder.tree(of: value, codingPath: [])
    }
}

/// Where one value is written: a reference, because nested containers fill their parent's slot
/// after the parent has handed them out.
private final class Slot {
    enum Content {
        case empty
        case value(JSONTree)
        case object(ObjectBox)
        case array(ArrayBox)
    }

    var content: Content

    init() { content = .empty }
    init(_ tree: JSONTree) { content = .value(tree) }
    init(_ box: ObjectBox) { content = .object(box) }
    init(_ box: ArrayBox) { content = .array(box) }

    var tree: JSONTree {
        switch content {
        case .empty: .object([:])
        case .value(let tree): tree
        case .object(let box): .object(box.members.mapValues(\.tree))
        case .array(let box): .array(box.elements.map(\.tree))
        }
    }
}

/// Objects and arrays under construction.
private final class ObjectBox {
    var members: [String: Slot] = [:]
}

private final class ArrayBox {
    var elements: [Slot] = []
}

private struct TreeEncoder: Encoder {
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }
    let slot: Slot

    static func tree(of value: some Encodable, codingPath: [any CodingKey]) throws -> JSONTree {
        // The types JSONEncoder writes in a form of its own.
        if let date = value as? Date { return .string(date.formatted(.iso8601)) }
        if let data = value as? Data { return .string(data.base64EncodedString()) }
        if let url = value as? URL { return .string(url.absoluteString) }
        let slot = Slot()
        try value.encode(to: TreeEncoder(codingPath: codingPath, slot: slot))
        return slot.tree
    }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        // A second call (a subclass's encoder after its superclass's) adds to the same object.
        if case .object(let box) = slot.content {
            return KeyedEncodingContainer(KeyedTreeContainer<Key>(codingPath: codingPath, box: box))
        }
        let box = ObjectBox()
        slot.content = .object(box)
        return KeyedEncodingContainer(KeyedTreeContainer<Key>(codingPath: codingPath, box: box))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        if case .array(let box) = slot.content { return UnkeyedTreeContainer(codingPath: codingPath, box: box) }
        let box = ArrayBox()
        slot.content = .array(box)
        return UnkeyedTreeContainer(codingPath: codingPath, box: box)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        SingleTreeContainer(codingPath: codingPath, slot: slot)
    }
}

private struct KeyedTreeContainer<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let codingPath: [any CodingKey]
    let box: ObjectBox

    private func put(_ tree: JSONTree, _ key: Key) { box.members[key.stringValue] = Slot(tree) }

    mutating func encodeNil(forKey key: Key) throws { put(.null, key) }
    mutating func encode(_ value: Bool, forKey key: Key) throws { put(.bool(value), key) }
    mutating func encode(_ value: String, forKey key: Key) throws { put(.string(value), key) }
    mutating func encode(_ value: Double, forKey key: Key) throws { put(try checked(value, key), key) }
    mutating func encode(_ value: Float, forKey key: Key) throws { put(try checked(Double(value), key), key) }
    mutating func encode(_ value: Int, forKey key: Key) throws { put(.int(Int64(value)), key) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { put(.int(Int64(value)), key) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { put(.int(Int64(value)), key) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { put(.int(Int64(value)), key) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { put(.int(value), key) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { put(.unsigned(UInt64(value)), key) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { put(.unsigned(UInt64(value)), key) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { put(.unsigned(UInt64(value)), key) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { put(.unsigned(UInt64(value)), key) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { put(.unsigned(value), key) }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        put(try TreeEncoder.tree(of: value, codingPath: codingPath + [key]), key)
    }

    // What the synthesized encoders call for optional properties: null, never a missing key.
    mutating func encodeIfPresent(_ value: Bool?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: String?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Double?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Float?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Int?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Int8?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Int16?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Int32?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: Int64?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: UInt?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: UInt8?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: UInt16?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: UInt32?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent(_ value: UInt64?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }
    mutating func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key) throws { try value.map { try encode($0, forKey: key) } ?? encodeNil(forKey: key) }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        let nested = ObjectBox()
        box.members[key.stringValue] = Slot(nested)
        return KeyedEncodingContainer(KeyedTreeContainer<NestedKey>(codingPath: codingPath + [key], box: nested))
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        box.members[key.stringValue] = Slot(nested)
        return UnkeyedTreeContainer(codingPath: codingPath + [key], box: nested)
    }

    mutating func superEncoder() -> any Encoder {
        let slot = Slot()
        box.members["super"] = slot
        return TreeEncoder(codingPath: codingPath + [JSONTree.Key("super")], slot: slot)
    }

    mutating func superEncoder(forKey key: Key) -> any Encoder {
        let slot = Slot()
        box.members[key.stringValue] = slot
        return TreeEncoder(codingPath: codingPath + [key], slot: slot)
    }

    private func checked(_ value: Double, _ key: Key) throws -> JSONTree {
        guard value.isFinite else {
            throw EncodingError.invalidValue(value, .init(codingPath: codingPath + [key], debugDescription: "JSON has no \(value)"))
        }
        return .double(value)
    }
}

private struct UnkeyedTreeContainer: UnkeyedEncodingContainer {
    let codingPath: [any CodingKey]
    let box: ArrayBox
    var count: Int { box.elements.count }

    private func append(_ tree: JSONTree) { box.elements.append(Slot(tree)) }
    private var index: JSONTree.Key { JSONTree.Key(String(count)) }

    mutating func encodeNil() throws { append(.null) }
    mutating func encode(_ value: Bool) throws { append(.bool(value)) }
    mutating func encode(_ value: String) throws { append(.string(value)) }
    mutating func encode(_ value: Double) throws {
        guard value.isFinite else { throw EncodingError.invalidValue(value, .init(codingPath: codingPath, debugDescription: "JSON has no \(value)")) }
        append(.double(value))
    }
    mutating func encode(_ value: Float) throws { try encode(Double(value)) }
    mutating func encode(_ value: Int) throws { append(.int(Int64(value))) }
    mutating func encode(_ value: Int8) throws { append(.int(Int64(value))) }
    mutating func encode(_ value: Int16) throws { append(.int(Int64(value))) }
    mutating func encode(_ value: Int32) throws { append(.int(Int64(value))) }
    mutating func encode(_ value: Int64) throws { append(.int(value)) }
    mutating func encode(_ value: UInt) throws { append(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt8) throws { append(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt16) throws { append(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt32) throws { append(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt64) throws { append(.unsigned(value)) }
    mutating func encode<T: Encodable>(_ value: T) throws {
        append(try TreeEncoder.tree(of: value, codingPath: codingPath + [index]))
    }

    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        let nested = ObjectBox()
        let path = codingPath + [index]
        box.elements.append(Slot(nested))
        return KeyedEncodingContainer(KeyedTreeContainer<NestedKey>(codingPath: path, box: nested))
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let nested = ArrayBox()
        let path = codingPath + [index]
        box.elements.append(Slot(nested))
        return UnkeyedTreeContainer(codingPath: path, box: nested)
    }

    mutating func superEncoder() -> any Encoder {
        let slot = Slot()
        let path = codingPath + [index]
        box.elements.append(slot)
        return TreeEncoder(codingPath: path, slot: slot)
    }
}

private struct SingleTreeContainer: SingleValueEncodingContainer {
    let codingPath: [any CodingKey]
    let slot: Slot

    mutating func encodeNil() throws { slot.content = .value(.null) }
    mutating func encode(_ value: Bool) throws { slot.content = .value(.bool(value)) }
    mutating func encode(_ value: String) throws { slot.content = .value(.string(value)) }
    mutating func encode(_ value: Double) throws {
        guard value.isFinite else { throw EncodingError.invalidValue(value, .init(codingPath: codingPath, debugDescription: "JSON has no \(value)")) }
        slot.content = .value(.double(value))
    }
    mutating func encode(_ value: Float) throws { try encode(Double(value)) }
    mutating func encode(_ value: Int) throws { slot.content = .value(.int(Int64(value))) }
    mutating func encode(_ value: Int8) throws { slot.content = .value(.int(Int64(value))) }
    mutating func encode(_ value: Int16) throws { slot.content = .value(.int(Int64(value))) }
    mutating func encode(_ value: Int32) throws { slot.content = .value(.int(Int64(value))) }
    mutating func encode(_ value: Int64) throws { slot.content = .value(.int(value)) }
    mutating func encode(_ value: UInt) throws { slot.content = .value(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt8) throws { slot.content = .value(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt16) throws { slot.content = .value(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt32) throws { slot.content = .value(.unsigned(UInt64(value))) }
    mutating func encode(_ value: UInt64) throws { slot.content = .value(.unsigned(value)) }
    mutating func encode<T: Encodable>(_ value: T) throws {
        slot.content = .value(try TreeEncoder.tree(of: value, codingPath: codingPath))
    }
}
